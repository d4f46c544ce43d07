"""Optimizers whose step touches only the rows a sparse gradient names."""
from .sparse import FusedSparseAdam, FusedSparseSGD

__all__ = ["FusedSparseAdam", "FusedSparseSGD"]
