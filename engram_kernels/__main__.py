"""`python -m engram_kernels`: which backends run here, and why the others do not."""
from .backends import report

print(report())
