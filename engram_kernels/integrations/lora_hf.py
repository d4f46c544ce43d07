"""LoRA adapters in Hugging Face models, saved and loaded in peft's format.

    apply_lora(model, r=16, alpha=32)            # every linear layer of attention and MLP
    save_lora(model, "adapter/")                 # adapter_config.json + adapter_model.safetensors
    load_lora(base_model, "adapter/")            # also loads adapters trained with peft

An adapter saved here loads with `peft.PeftModel.from_pretrained(base, "adapter/")` and vice versa:
the tensors are named `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r), as peft names them.
"""
import contextlib
import json
import os
import re
import warnings

from safetensors.torch import load_file, save_file
from torch import nn

from ..modules.lora import LoRALinear, MultiLoRALinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."


CLASSIFIER_HEADS = ("score", "classifier")  # peft's names for a classification model's head
# peft's task types for model classes it loads without extra modules; for the others (classifiers,
# whose task types make peft expect the head's weights in the adapter) the saved task_type is null
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def _output_layers(model):
    """The model's output head: its output embeddings, or else a classifier head (as peft's all-linear)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        head = next((getattr(model, n) for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)),
                    None)
    return {id(head)} if head is not None else set()


def task_type(model):
    """peft's task_type for the model's class (None: peft loads a plain PeftModel)."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def _matches(name, targets):
    if isinstance(targets, str):  # a regex over the full name, as in peft
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_not_peft(model):
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise TypeError(f"{type(model).__name__} has peft adapters already: merge them (merge_and_unload()) or load "
                        "the adapter onto the base model with load_lora instead")


def _linear_names(model):
    """Names of the model's linear layers, an adapted one by its LoRALinear's name."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear, MultiLoRALinear)) and not name.endswith(".base_layer")]


def target_names(model, target_modules=None):
    """Names of the nn.Linear layers to adapt: `target_modules` as in peft (a list of name
    suffixes, a regex, or None / "all-linear" for every linear layer but the output head)."""
    _check_not_peft(model)
    heads = _output_layers(model)
    names, adapted = [], []
    for name in _linear_names(model):
        module = model.get_submodule(name)
        if target_modules in (None, "all-linear"):
            chosen = id(module) not in heads and name.split(".")[-1] != "lm_head"
        else:
            chosen = _matches(name, target_modules)
        if chosen:
            (adapted if isinstance(module, (LoRALinear, MultiLoRALinear)) else names).append(name)
    if adapted and not names:
        raise ValueError(f"{type(model).__name__}: every layer matching target_modules={target_modules!r} has an "
                         f"adapter already (e.g. {adapted[0]})")
    if not names:
        raise ValueError(f"{type(model).__name__}: no nn.Linear matches target_modules={target_modules!r}")
    return names


def _tied_names(model):
    """{id(parameter): names} of parameters that several modules share (tied embeddings)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {key: v for key, v in names.items() if len(v) > 1}


def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _pattern_value(name, patterns, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):  # as peft's get_pattern_key
            return value
    return default


def apply_lora(model, target_modules=None, r=8, alpha=8, dropout=0.0, use_rslora=False, rank_pattern=None,
               alpha_pattern=None, join_weights=False):
    """Freeze `model` and wrap each target nn.Linear in a LoRALinear; returns the model.

    Defaults follow peft's LoraConfig (r=8, lora_alpha=8, no dropout) with target_modules=None
    meaning "all-linear": every linear layer of attention and MLP, not the output head.
    `join_weights`: see LoRALinear (one GEMM per forward on GPUs; off until a GPU run has timed it).
    """
    names = target_names(model, target_modules)
    tied = _tied_names(model)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear(base, _pattern_value(name, rank_pattern, r), _pattern_value(name, alpha_pattern, alpha),
                           dropout, use_rslora, join_weights=join_weights)
        shared = [n for n in tied.get(id(base.weight), []) if n != f"{name}.weight"]
        if shared:
            warnings.warn(f"apply_lora: {name}'s weight is tied to {', '.join(shared)}; its adapter works, but it "
                          "cannot be merged (merging would change the tied layers too)")
            layer.tied_to = shared
        _replace(model, name, layer)
    model._engram_lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
                                 "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
    return model


def lora_layers(model):
    """{name: LoRALinear} of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model's outputs inside the block (adapters skipped, not removed; merged layers are
    unmerged for the block and merged again after it, both exact)."""
    layers = list(lora_layers(model).values())
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()


def merge_lora_layers(model):
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora_layers(model):
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def with_adapter_ids(model, adapter_ids):
    """Route a batch through MultiLoRALinear adapters: ids per row or per sequence (-1: none)."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    for layer in layers:
        layer.adapter_ids = adapter_ids
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_ids = None


def lora_state_dict(model):
    """peft-named adapter tensors: base_model.model.<module>.lora_A.weight / .lora_B.weight."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    return tensors


def adapter_config(model):
    """peft's LoraConfig fields for the adapters in `model`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (call apply_lora first)")
    config = getattr(model, "_engram_lora_config", None) or {}
    first = next(iter(layers.values()))
    r, alpha = config.get("r", first.r), config.get("lora_alpha", first.alpha)
    base_config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.get("lora_dropout", first.dropout),
        "use_rslora": config.get("use_rslora", first.use_rslora),
        "target_modules": _saved_targets(model, layers),
        "rank_pattern": {name: m.r for name, m in layers.items() if m.r != r},
        "alpha_pattern": {name: m.alpha for name, m in layers.items() if m.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _saved_targets(model, layers):
    """The layer names' suffixes when they select exactly the adapted layers in peft, else a regex of
    the full names (a subset of the layers, e.g. one block's q_proj)."""
    suffixes = sorted({name.split(".")[-1] for name in layers})
    if {n for n in _linear_names(model) if _matches(n, suffixes)} == set(layers):
        return suffixes
    return "(?:" + "|".join(re.escape(name) for name in sorted(layers)) + ")"


def save_lora(model, path):
    """adapter_config.json + adapter_model.safetensors in `path`, loadable by peft."""
    os.makedirs(path, exist_ok=True)
    config = adapter_config(model)
    save_file(lora_state_dict(model), os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return path


def _module_name(key):
    """base_model.model.<module>.lora_A[.<adapter>].weight -> (<module>, "lora_A")."""
    match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
    if match is None:
        raise ValueError(f"not a peft LoRA tensor name: {key!r}")
    return match.group(1), match.group(2)


def load_lora(model, path, trainable=False):
    """Apply and fill the adapter saved at `path` (by save_lora or by peft) onto `model`."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if config.get("bias", "none") != "none" or config.get("modules_to_save") or unsupported:
        raise ValueError(f"{path}: only plain LoRA is supported (bias='none', no modules_to_save, no DoRA)")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    wanted = sorted({_module_name(key)[0] for key in tensors})
    apply_lora(model, target_modules=wanted, r=config["r"], alpha=config["lora_alpha"],
               dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False),
               rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"))
    layers = lora_layers(model)
    for key, tensor in tensors.items():
        name, which = _module_name(key)
        param = getattr(layers[name], which)
        if param.shape != tensor.shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not match the layer's {tuple(param.shape)}")
        param.data.copy_(tensor)
    for p in lora_parameters(model):
        p.requires_grad_(trainable)
    return model
