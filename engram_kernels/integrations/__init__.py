"""Put the modules into third-party models (Hugging Face transformers)."""
from .hf import (add_memory_layers, calibrate_memory_queries, load_memory, memory_disabled, memory_layers,
                 memory_parameters, save_memory)
from .lora_hf import apply_lora, load_lora, lora_disabled, lora_layers, lora_parameters, save_lora, with_adapter_ids

__all__ = ["add_memory_layers", "calibrate_memory_queries", "memory_layers", "memory_disabled", "memory_parameters",
           "save_memory", "load_memory",
           "apply_lora", "lora_layers", "lora_parameters", "lora_disabled", "save_lora", "load_lora",
           "with_adapter_ids"]
