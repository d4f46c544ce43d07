"""Fused LoRA ops: single-adapter linear with dropout, many adapters per batch (SGMV segments),
merge / exact unmerge. `naive.py` is the reference; `functional.py` the dispatching public API."""
from .functional import lora_linear, lora_linear_multi, merge_lora, unmerge_lora

__all__ = ["lora_linear", "lora_linear_multi", "merge_lora", "unmerge_lora"]
