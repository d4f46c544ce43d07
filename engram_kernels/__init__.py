"""engram_kernels: write new knowledge into a frozen language model's memory layers, fast."""
from . import backends
from .backends import use_backend
from .ops.memory import pk_topk, sparse_adam_step, sparse_sgd_step, weighted_gather

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "pk_topk", "weighted_gather", "sparse_sgd_step", "sparse_adam_step"]
