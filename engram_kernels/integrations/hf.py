"""Memory layers in Hugging Face causal LMs: a residual branch beside the MLP of chosen decoder layers.

Works for decoder stacks whose layers call `self.mlp(hidden)` and add the result to the residual
stream: Llama (SmolLM2), Qwen2, Qwen3, Mistral, Gemma3 (there the memory output passes through the
post-feed-forward norm with the MLP's). Memory weights save apart from the base model as
`memory.safetensors` + `memory_config.json`, so one base can carry many memories.
"""
import contextlib
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..modules import NgramMemory, ProductKeyMemory

WEIGHTS_NAME = "memory.safetensors"
CONFIG_NAME = "memory_config.json"
FORMAT_VERSION = 1


class MLPWithMemory(nn.Module):
    """mlp(x) + memory(x): the original MLP untouched, the memory beside it."""

    def __init__(self, mlp, memory):
        super().__init__()
        self.mlp = mlp
        self.memory = memory
        self.memory_enabled = True

    def forward(self, x, *args, **kwargs):
        out = self.mlp(x, *args, **kwargs)
        return out + self.memory(x) if self.memory_enabled else out


def _text_decoder(model):
    """The language model's decoder (not a vision tower's encoder) where the model names it."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else model


def decoder_layers(model):
    """The ModuleList of decoder blocks (each with an `.mlp`) of a causal LM."""
    for name, module in _text_decoder(model).named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) \
                and all(hasattr(block, "mlp") for block in module):
            return module
    raise ValueError(f"{type(model).__name__}: found no decoder layers with an `.mlp` to attach memory to")


def _memory_dim(model, config):
    """config's dim, defaulting to the model's hidden size, which it must equal where the config
    has one: the memory reads and writes the residual stream."""
    text_config = getattr(model, "config", None)
    text_config = getattr(text_config, "text_config", None) or text_config
    size = getattr(text_config, "hidden_size", None)
    dim = config.setdefault("dim", size)
    if dim is None:
        raise ValueError(f"{type(model).__name__}: config has no hidden_size; pass dim= explicitly")
    if size is not None and dim != size:
        raise ValueError(f"memory dim {dim} does not match {type(model).__name__}'s hidden size {size}")


def _resolve_layers(layers, count):
    if layers is None:
        layers = [count // 2]
    layers = sorted({i + count if i < 0 else i for i in ([layers] if isinstance(layers, int) else layers)})
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise IndexError(f"layer indices {bad} out of range for a model with {count} decoder layers")
    return layers


MEMORY_CLASSES = {"product_keys": ProductKeyMemory, "ngram": NgramMemory}


def add_memory_layers(model, layers=None, addressing="product_keys", **config):
    """Add a memory beside the MLP of each chosen decoder layer (default: the middle one).

    `addressing` "product_keys": a ProductKeyMemory, `config` its arguments (heads, k, n_keys,
    key_dim, value_dim, gated, value_init, sparse_grad); "ngram": an NgramMemory (n_slots, orders,
    heads, ...), and `model`'s forward is hooked to hand it the input_ids. dim defaults to the
    model's hidden size, dtype and device to the MLP's. With the default zero-initialized values
    the model's outputs are unchanged. Returns the model.
    """
    if addressing not in MEMORY_CLASSES:
        raise ValueError(f"addressing must be one of {sorted(MEMORY_CLASSES)}, got {addressing!r}")
    blocks = decoder_layers(model)
    _memory_dim(model, config)
    chosen = _resolve_layers(layers, len(blocks))
    taken = [i for i in chosen if isinstance(blocks[i].mlp, MLPWithMemory)]
    if taken:
        raise ValueError(f"decoder layer {taken[0]} already has a memory layer")
    memories = {}  # all built before any is attached: a bad config leaves the model as it was
    for i in chosen:
        reference = next(blocks[i].mlp.parameters())
        memories[i] = MEMORY_CLASSES[addressing](**config, dtype=reference.dtype, device=reference.device)
    for i, memory in memories.items():
        blocks[i].mlp = MLPWithMemory(blocks[i].mlp, memory)
    if addressing == "ngram" and not any(hook is _hand_tokens for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_hand_tokens, with_kwargs=True)
    return model


def _hand_tokens(model, args, kwargs):
    """Forward pre-hook: give every NgramMemory of `model` the call's input_ids. A module-level
    function, so a deep copy of the model keeps a working hook."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise ValueError("a model with n-gram memory must be called with input_ids, not inputs_embeds")
    past = kwargs.get("past_key_values")
    continues = past is not None and past.get_seq_length() > 0
    for memory in memory_layers(model).values():
        if isinstance(memory, NgramMemory):
            memory.set_tokens(ids, continues)


def memory_layers(model):
    """{decoder layer index: ProductKeyMemory or NgramMemory} for the memories in `model`."""
    return {i: block.mlp.memory for i, block in enumerate(decoder_layers(model))
            if isinstance(block.mlp, MLPWithMemory)}


@contextlib.contextmanager
def memory_disabled(model):
    """Run `model` as its base inside the block (e.g. as a context-distillation teacher)."""
    wrappers = [block.mlp for block in decoder_layers(model) if isinstance(block.mlp, MLPWithMemory)]
    for wrapper in wrappers:
        wrapper.memory_enabled = False
    try:
        yield model
    finally:
        for wrapper in wrappers:
            wrapper.memory_enabled = True


@torch.no_grad()
def calibrate_memory_queries(model, batches, shrinkage=0.1):
    """Run `model` over `batches` of (input_ids, attention_mask) and calibrate every memory's
    queries on the inputs it sees at unmasked positions (ProductKeyMemory.calibrate_queries).
    Meant for fresh memories, before any training; returns the model."""
    layers = memory_layers(model)
    if not layers:
        raise ValueError("model has no memory layers: add_memory_layers(model, ...) first")
    layers = {layer: memory for layer, memory in layers.items() if isinstance(memory, ProductKeyMemory)}
    if not layers:  # n-gram memories have no queries
        return model
    seen = {layer: [] for layer in layers}
    keep = {}

    def collector(layer):
        return lambda module, args: seen[layer].append(args[0].reshape(-1, module.dim)[keep["mask"]].float().cpu())

    hooks = [memory.register_forward_pre_hook(collector(layer)) for layer, memory in layers.items()]
    try:
        for ids, mask in batches:
            keep["mask"] = mask.reshape(-1).bool()
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, memory in layers.items():
        memory.calibrate_queries(torch.cat(seen[layer]) if seen[layer] else torch.empty(0, memory.dim), shrinkage)
    return model


def memory_parameters(model):
    return [p for memory in memory_layers(model).values() for p in memory.parameters()]


def save_memory(model, path):
    """Write the memory layers' weights and config into directory `path`."""
    layers = memory_layers(model)
    if not layers:
        raise ValueError("model has no memory layers to save")
    os.makedirs(path, exist_ok=True)
    tensors = {f"layers.{i}.{name}": t.detach().contiguous().cpu()
               for i, memory in layers.items() for name, t in memory.state_dict().items()}
    config = {"format_version": FORMAT_VERSION,
              "layers": {str(i): memory.config() for i, memory in layers.items()}}
    tmp = os.path.join(path, WEIGHTS_NAME + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", "engram_format_version": str(FORMAT_VERSION)})
    os.replace(tmp, os.path.join(path, WEIGHTS_NAME))  # a crash never leaves a half-written file
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_memory(model, path):
    """Load memory layers saved by save_memory, adding them to `model` where it has none."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported memory format {config.get('format_version')!r}")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    existing = memory_layers(model)
    added = []
    try:
        for key, layer_config in config["layers"].items():
            i = int(key)
            if i not in existing:
                add_memory_layers(model, layers=[i], **layer_config)
                added.append(i)
            memory = memory_layers(model)[i]
            if memory.config() != layer_config:
                raise ValueError(f"layer {i}: saved memory config {layer_config} differs from the model's "
                                 f"{memory.config()}")
            prefix = f"layers.{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if isinstance(memory, ProductKeyMemory):  # saved before calibration existed
                state.setdefault("query_center", torch.zeros_like(memory.query_center))
            memory.load_state_dict(state)
    except Exception:
        blocks = decoder_layers(model)
        for i in added:  # leave the model as it was
            blocks[i].mlp = blocks[i].mlp.mlp
        raise
    return model
