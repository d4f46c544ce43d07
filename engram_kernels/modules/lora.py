"""LoRALinear and MultiLoRALinear: nn.Linear with low-rank adapters over the fused LoRA ops.

LoRALinear follows peft's LoRA layer: y = base(x) + lora_B(lora_A(dropout(x))) · alpha / r
(alpha / sqrt(r) with use_rslora), A Kaiming-uniform and B zero at init, so a fresh adapter changes
nothing. The base layer is frozen and kept as `base_layer`, as in peft.
"""
import math
import warnings

import torch
from torch import nn

from ..ops.lora import lora_linear, lora_linear_multi, merge_lora, unmerge_lora
from ..ops.lora.composite import joined_copies, joined_weight


def lora_scale(r, alpha, use_rslora=False):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_base(base, r):
    if not isinstance(base, nn.Linear):
        raise TypeError(f"LoRA wraps an nn.Linear, got {type(base).__name__}")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"rank r must be an int >= 1, got {r!r}")
    base.requires_grad_(False)


class LoRALinear(nn.Module):
    """Drop-in for the nn.Linear `base` with one trainable adapter of rank r.

    forward runs the fused op (one pass for base and branch, no ΔW, dropout regenerated from a
    seed in the backward). `merge()` folds the adapter into the base weight (then forward is the
    plain linear); `unmerge()` restores the original weight bit for bit (to within rounding if the
    layer was cast to another dtype while merged). As in peft, `merged` is not part of the state dict.

    `join_weights=True` keeps the frozen weight W and lora_B side by side in one (out, in + r) buffer
    (the Parameters stay the same objects, as views), so the GPU forward is one GEMM over [x | s·u]
    instead of a GEMM plus the branch's write and re-read of y. It joins at the first forward and again
    after anything that separates them (.to(), load_state_dict(assign=True)); not with a weight tied
    to another layer or an adapter dtype other than the weight's, and not for parameters a wrapper such
    as FSDP re-creates every step (each forward would copy W again). The state dict holds contiguous copies.
    """

    def __init__(self, base, r=8, alpha=8, dropout=0.0, use_rslora=False, adapter_dtype=None, join_weights=False):
        super().__init__()
        _check_base(base, r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"dtype": adapter_dtype or base.weight.dtype, "device": base.weight.device}
        self.base_layer = base
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = lora_scale(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        self.merged, self.disabled = False, False
        self.tied_to = []  # names sharing the base weight (tied embeddings): merging would change them
        # a buffer, so it follows .to(device); it stays an int under .to(dtype), and _merged_dtype says
        # which weight dtype its bit differences belong to
        self.register_buffer("_merge_residual", None, persistent=False)
        self._merged_dtype = None
        self.join_weights = join_weights
        self.register_state_dict_post_hook(_unshared_state)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default (init_lora_weights=True)
        nn.init.zeros_(self.lora_B)

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout}, merged={self.merged}")

    def joined(self):
        return joined_weight(self.weight, self.lora_B) is not None

    @torch.no_grad()
    def _join(self):
        w, b = self.weight, self.lora_B
        if self.tied_to or w.dtype != b.dtype or w.device != b.device or self.joined():
            return
        w.data, b.data = joined_copies(w, b)

    def forward(self, x):
        if self.disabled and self.merged:  # as peft: the base model's output needs the weight back
            self.unmerge()
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.join_weights:
            self._join()
        dtype = x.dtype
        return lora_linear(x, self.weight.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling,
                           None if self.bias is None else self.bias.to(dtype),
                           dropout=self.dropout if self.training else 0.0)

    def merge(self):
        if self.tied_to:
            raise ValueError(f"cannot merge a LoRA layer whose weight is tied to {', '.join(self.tied_to)}: "
                             "merging would change those layers too")
        if not self.merged:
            self._merge_residual = merge_lora(self.weight.data, self.lora_A.data, self.lora_B.data, self.scaling)
            self._merged_dtype, self.merged = self.weight.dtype, True
        return self

    def unmerge(self):
        if self.merged:
            residual = self._merge_residual
            if self._merged_dtype != self.weight.dtype:
                warnings.warn(f"LoRALinear was cast from {self._merged_dtype} to {self.weight.dtype} while merged: "
                              "unmerge restores the weight to within rounding, not bit for bit")
                residual = None
            unmerge_lora(self.weight.data, self.lora_A.data, self.lora_B.data, self.scaling, residual)
            self.merged, self._merge_residual, self._merged_dtype = False, None, None
        return self


def _unshared_state(module, state_dict, prefix, local_metadata):
    """Joined W and B as contiguous tensors: safetensors (and save_pretrained) refuse, or drop as tied,
    tensors that share a buffer."""
    if module.joined():
        for key in (prefix + "base_layer.weight", prefix + "lora_B"):
            if key in state_dict:
                state_dict[key] = state_dict[key].contiguous()


class MultiLoRALinear(nn.Module):
    """nn.Linear with a stack of `n_adapters` adapters; row i of a batch uses `adapter_ids[i]`.

    Set the ids per batch with `module.adapter_ids = ids` (shape x.shape[:-1], -1 for none) or the
    `with_adapter_ids(model, ids)` context of engram_kernels.integrations.lora_hf; every adapter's
    gradient comes from its own rows only. Ranks are equal (pad a smaller adapter with zeros).
    """

    def __init__(self, base, n_adapters, r=8, alpha=8, use_rslora=False, adapter_dtype=None):
        super().__init__()
        _check_base(base, r)
        factory = {"dtype": adapter_dtype or base.weight.dtype, "device": base.weight.device}
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.lora_A = nn.Parameter(torch.empty(n_adapters, r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, r, **factory))
        self.register_buffer("scales", torch.full((n_adapters,), lora_scale(r, alpha, use_rslora),
                                                  device=base.weight.device))
        self.adapter_ids = None
        with torch.no_grad():
            for a in range(n_adapters):
                nn.init.kaiming_uniform_(self.lora_A[a], a=math.sqrt(5))

    @property
    def n_adapters(self):
        return self.lora_A.shape[0]

    def _apply(self, fn, *args, **kwargs):
        scales = self.scales
        super()._apply(fn, *args, **kwargs)
        self.scales = scales.to(self.lora_A.device)  # fp32 under .to(dtype): a bf16 scale is off by ~0.2%
        return self

    def forward(self, x):
        if self.adapter_ids is None:
            return self.base_layer(x)
        dtype, bias = x.dtype, self.base_layer.bias
        return lora_linear_multi(x, self.base_layer.weight.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype),
                                 self.scales, self.adapter_ids, None if bias is None else bias.to(dtype))
