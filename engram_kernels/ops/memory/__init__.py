"""Product-key memory ops: top-k slot selection, weighted gather with a sparse backward, and fused
sparse optimizer steps. `naive.py` is the reference; `functional.py` the dispatching public API."""
from .functional import pk_topk, sparse_adam_step, sparse_sgd_step, weighted_gather

__all__ = ["pk_topk", "weighted_gather", "sparse_sgd_step", "sparse_adam_step"]
