"""Pure-PyTorch reference of the KV-cache ops (KIVI: keys per channel, values per token).

Layout shared by every backend:
  keys, values        (B, H, T, D) float, H = KV heads
  key codes           (B, H, T, D * bits / 8) uint8
  key scale, zero     (B, H, ceil(T / G), D) float16: one pair per channel per group of G tokens
  value codes         (B, H, T, D * bits / 8) uint8
  value scale, zero   (B, H, T, D / Gv) float16: one pair per token per group of Gv = min(G, D) channels
Codes are packed "planar" along channels: with P = D * bits / 8 bytes per token, byte j holds the
codes of channels j, j + P, j + 2P, ... in its low-to-high bit fields, so unpacking gives whole
contiguous runs of channels (vectorizes on CPUs and GPUs alike). x ~= scale * code + zero.
"""
import math

import torch
import torch.nn.functional as F

SCALE_DTYPE = torch.float16


def codes_per_byte(bits):
    return 8 // bits


def value_group(head_dim, group_size):
    """Channels per value group: the group size, capped at the head dim."""
    return min(group_size, head_dim)


def pack(codes, bits):
    """(..., D) integer codes in [0, 2**bits) -> (..., D * bits / 8) uint8, planar along D."""
    per = codes_per_byte(bits)
    planes = codes.to(torch.uint8).unflatten(-1, (per, -1))  # (..., per, P)
    packed = torch.zeros_like(planes[..., 0, :])
    for i in range(per):
        packed |= planes[..., i, :] << (bits * i)
    return packed


def unpack(packed, bits):
    """(..., P) uint8 -> (..., P * 8 / bits) uint8 codes."""
    mask = (1 << bits) - 1
    planes = [(packed >> (bits * i)) & mask for i in range(codes_per_byte(bits))]
    return torch.cat(planes, dim=-1)


def _min_max_codes(x, dim, bits):
    """Asymmetric min/max quantization of x along `dim`: (codes, scale, zero), scale/zero in fp16.
    Codes are computed from the fp16-rounded scale and zero, the ones dequantization uses."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    zero = lo.to(SCALE_DTYPE)
    scale = ((hi - lo) / levels).to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((x - zero.float()) / safe).clamp_(0, levels)
    return codes, scale, zero


def _key_groups(keys, group_size):
    """keys (B, H, T, D) -> fp32 (B, H, T/G, G, D) padded with NaN rows, and its per-channel
    (min, max) over each group, NaN-aware (so the last group may be partial)."""
    b, h, t, d = keys.shape
    n_groups = math.ceil(t / group_size)
    x = F.pad(keys.float(), (0, 0, 0, n_groups * group_size - t), value=float("nan"))
    x = x.view(b, h, n_groups, group_size, d)
    lo = torch.where(torch.isnan(x), torch.inf, x).amin(3, keepdim=True)
    hi = torch.where(torch.isnan(x), -torch.inf, x).amax(3, keepdim=True)
    return x, lo, hi


def clip_key_range(keys, group_size, ratio):
    """Clamps each channel of each group of `group_size` tokens to the middle `ratio` of its
    [min, max] range. Quantizing the result spends the few int2 levels on the bulk of the values
    rather than on rare extremes; every backend's min/max then finds the clipped range. A
    pre-pass in plain torch, so all backends share it."""
    if ratio >= 1:
        return keys
    x, lo, hi = _key_groups(keys, group_size)
    mid, half = (lo + hi) / 2, (hi - lo) * (ratio / 2)
    x = torch.minimum(torch.maximum(x, mid - half), mid + half)
    return x.flatten(2, 3)[:, :, :keys.shape[2]].to(keys.dtype)


def quantize_keys(keys, bits, group_size):
    """Per-channel groups of `group_size` tokens (the last group may be partial)."""
    b, h, t, d = keys.shape
    x, lo, hi = _key_groups(keys, group_size)
    n_groups = x.shape[2]
    levels = (1 << bits) - 1
    zero, scale = lo.to(SCALE_DTYPE), ((hi - lo) / levels).to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((x - zero.float()) / safe).clamp_(0, levels).nan_to_num_(0)
    codes = codes.view(b, h, n_groups * group_size, d)[:, :, :t]
    return pack(codes, bits), scale.squeeze(3), zero.squeeze(3)


def quantize_values(values, bits, group_size):
    """Per-token groups of min(group_size, D) channels."""
    b, h, t, d = values.shape
    gv = value_group(d, group_size)
    x = values.float().view(b, h, t, d // gv, gv)
    codes, scale, zero = _min_max_codes(x, -1, bits)
    return pack(codes.view(b, h, t, d), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_keys(codes, scale, zero, bits, group_size, dtype=torch.float32):
    t = codes.shape[2]
    index = torch.arange(t, device=codes.device) // group_size
    s, z = scale.float()[:, :, index], zero.float()[:, :, index]
    return (unpack(codes, bits).float() * s + z).to(dtype)


def dequantize_values(codes, scale, zero, bits, group_size, dtype=torch.float32):
    q = unpack(codes, bits).float()
    d = q.shape[-1]
    gv = value_group(d, group_size)
    s = scale.float().repeat_interleave(gv, dim=-1)
    z = zero.float().repeat_interleave(gv, dim=-1)
    return (q * s + z).to(dtype)


def causal_mask(q_len, kv_len, device):
    """Query i (the i-th of the newest q_len tokens) sees keys 0 .. kv_len - q_len + i."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows


def attention(query, keys, values, scale):
    """Causal GQA attention of the newest query tokens against full keys/values, fp32 math."""
    n_rep = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(n_rep, dim=1)
    v = values.float().repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), k) * scale
    mask = causal_mask(query.shape[2], keys.shape[2], query.device)
    scores = scores.masked_fill(~mask, -torch.inf)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, -1), v).to(query.dtype)


def full_cache(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
               residual_values, bits, group_size, dtype=torch.float32):
    """The dequantized packed tokens followed by the residual window, as plain (keys, values)."""
    keys = dequantize_keys(key_codes, key_scale, key_zero, bits, group_size, dtype)
    values = dequantize_values(value_codes, value_scale, value_zero, bits, group_size, dtype)
    if residual_keys is not None:
        keys = torch.cat([keys, residual_keys.to(dtype)], dim=2)
        values = torch.cat([values, residual_values.to(dtype)], dim=2)
    return keys, values


def decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                     residual_keys, residual_values, bits, group_size, scale):
    keys, values = full_cache(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                              residual_keys, residual_values, bits, group_size)
    return attention(query, keys, values, scale)
