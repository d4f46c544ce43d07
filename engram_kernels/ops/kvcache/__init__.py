"""KV-cache compression ops (KIVI): keys quantized per channel, values per token, to 4 or 2 bits,
and decode attention computed straight from the packed cache. `naive.py` is the reference;
`functional.py` the dispatching public API."""
from .functional import (PackedKV, decode_attention, dequantize_keys, dequantize_kv, dequantize_values, quantize_keys,
                         quantize_kv, quantize_values)

__all__ = ["PackedKV", "quantize_keys", "quantize_values", "quantize_kv", "dequantize_keys", "dequantize_values",
           "dequantize_kv", "decode_attention"]
