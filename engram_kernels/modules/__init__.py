"""Drop-in torch modules over the kernels."""
from .lora import LoRALinear, MultiLoRALinear
from .memory import ProductKeyMemory
from .ngram_memory import NgramMemory

__all__ = ["ProductKeyMemory", "NgramMemory", "LoRALinear", "MultiLoRALinear", "QuantizedKVCache",
           "enable_packed_kv_attention"]


def __getattr__(name):  # the KV cache needs transformers: imported on first use
    if name in ("QuantizedKVCache", "enable_packed_kv_attention"):
        from . import kv_cache
        return getattr(kv_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
