"""Put the modules into third-party models (Hugging Face transformers)."""
from .hf import add_memory_layers, load_memory, memory_disabled, memory_layers, memory_parameters, save_memory

__all__ = ["add_memory_layers", "memory_layers", "memory_disabled", "memory_parameters", "save_memory", "load_memory"]
