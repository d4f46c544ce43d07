"""engram_kernels: write new knowledge into a frozen language model's memory layers, fast."""
from . import backends
from .backends import use_backend
from .ops.lora import lora_linear, lora_linear_multi, merge_lora, unmerge_lora
from .ops.kvcache import PackedKV, decode_attention, dequantize_kv, quantize_kv
from .ops.memory import pk_topk, sparse_adam_step, sparse_sgd_step, weighted_gather

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "pk_topk", "weighted_gather", "sparse_sgd_step", "sparse_adam_step",
           "lora_linear", "lora_linear_multi", "merge_lora", "unmerge_lora",
           "PackedKV", "quantize_kv", "dequantize_kv", "decode_attention"]
