"""Drop-in torch modules over the kernels."""
from .memory import ProductKeyMemory

__all__ = ["ProductKeyMemory"]
