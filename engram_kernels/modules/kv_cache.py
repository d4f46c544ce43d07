"""QuantizedKVCache: a `transformers` Cache that keeps keys and values KIVI-packed (int4/int2) and
lets decoding read them through the fused packed-cache attention.

    from engram_kernels.modules import QuantizedKVCache, enable_packed_kv_attention
    enable_packed_kv_attention(model)                  # registers and selects the attention function
    cache = QuantizedKVCache(model.config, bits=4)     # group_size=64, residual_length=128
    model.generate(**inputs, past_key_values=cache)

Per full-attention layer the newest `residual_length` tokens stay in full precision; whenever the
residual window holds a whole group beyond that, its oldest `group_size` tokens are quantized
and appended to the packed store. The prompt (prefill) runs ordinary attention over its own
full-precision states and is quantized afterwards. Decode steps then call
`engram_kernels.ops.kvcache.decode_attention` on the packed store plus the residual window: the
layer's `update` returns the new states tagged with their layer, and the registered attention
function reads the packed cache from there (also for several new tokens at once, causal). Steps
with a padding mask (left-padded batches) take the dequantize-then-SDPA path, with the same numbers.

Beyond KIVI, three options that make int2 usable on small models (measured in
scripts/kv_quality.py / eval_results/kv_quality.json; `sink_length=0, key_clip=1.0` is plain KIVI):
  * `sink_length=S` (default 16) keeps the first S tokens in full precision (attention sinks draw
    large weights and have outlying keys);
  * `key_clip=c` < 1 quantizes each key group over the middle c of its range (default: 0.7 for
    int2, 1.0 for int4): the four int2 levels go to the bulk of the values. Keep sinks with it:
    their keys are the outliers that clipping would otherwise flatten;
  * `rotate=True` stores keys and values multiplied by a fixed orthogonal (randomized Hadamard)
    matrix R per head: q.k and p.V are unchanged when the query is rotated too and the output
    rotated back, and the rotation spreads outlying channels over all channels. The kernels are
    untouched; a decode step pays two small (D x D) products per layer.

Without `enable_packed_kv_attention` (or with `packed_attention=False`) the cache works with any
attention implementation: `update` returns the dequantized keys and values, as transformers' own
QuantizedCache does. Sliding-window layers (Gemma3, Qwen2 with sliding windows) keep their
ordinary full-precision layers; Llama (SmolLM2), Mistral, Qwen2 and Qwen3 models run entirely packed.
"""
import functools
import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops.kvcache import PackedKV, decode_attention, quantize_kv
from ..ops.kvcache import checks, naive

ATTENTION_NAME = "engram_packed_kv"
_LAYER_ATTR = "_engram_kv_layer"  # set on the key states a packed layer hands to attention


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: a PackedKV store plus the tokens held in full precision, `self.keys` and
    `self.values` (B, H, S + R, D) as in DynamicLayer: the first S = `n_sinks` tokens (attention
    sinks), then the residual window of the newest R. The packed tokens lie between the two."""

    is_croppable = False

    def __init__(self, bits=4, group_size=64, residual_length=128, packed_attention=True, sink_length=16,
                 key_clip=None, rotate=False):
        super().__init__()
        checks.check_bits("QuantizedKVCache", bits)
        key_clip = default_key_clip(bits) if key_clip is None else key_clip
        checks.check_clip("QuantizedKVCache", key_clip)
        if group_size < 1 or residual_length < 0 or sink_length < 0:
            raise ValueError(f"group_size must be >= 1, residual_length and sink_length >= 0, got {group_size}, "
                             f"{residual_length}, {sink_length}")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.sink_length = sink_length
        self.packed_attention = packed_attention
        self.key_clip, self.rotate = key_clip, rotate
        self.rotation = None
        self.packed = None
        self.cumulative_length = 0
        self._unread = False  # a decode step's tagged states not yet read by packed_kv_attention

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.rotate:
            self.rotation = hadamard_rotation(key_states.shape[-1], key_states.device)
        self._empty(key_states[..., :0, :], value_states[..., :0, :])
        self.is_initialized = True

    def _empty(self, keys, values):
        self.keys, self.values = keys, values
        self.n_sinks = 0
        self.packed = quantize_kv(keys, values, self.bits, self.group_size, check_values=False)
        self.cumulative_length, self._unread = 0, False

    def reset(self):
        """Forgets every cached token (packed, sinks, residual window); the layer stays usable."""
        if self.is_initialized:
            self._empty(self.keys[..., :0, :], self.values[..., :0, :])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prefill = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, self.rotated(key_states)], dim=-2)
        self.values = torch.cat([self.values, self.rotated(value_states)], dim=-2)
        # The first `sink_length` tokens stay in full precision for good: attention sinks draw large
        # weights, and their outlying keys would stretch the quantization range of their group.
        self.n_sinks = min(self.sink_length, self.cumulative_length)
        self._flush()
        if prefill:  # the prompt attends to its own full-precision states
            return key_states, value_states
        if not self.packed_attention:
            return self.dequantized()
        if self._unread:
            raise RuntimeError(
                "QuantizedKVCache(packed_attention=True): the last decode step's attention did not read the "
                "packed cache, so it attended to the new tokens only. Call enable_packed_kv_attention(model) "
                "before generating, or build the cache with packed_attention=False.")
        self._unread = True
        setattr(key_states, _LAYER_ATTR, self)
        return key_states, value_states

    def full_precision(self):
        """(keys, values) held in full precision: the sinks, then the residual window. Attention
        is order-free, so the kernel may see the sinks after the packed tokens; only the newest
        tokens' order matters (causality), and they stay last."""
        return self.keys, self.values

    def residual_tokens(self):
        """Tokens in the residual window (the full-precision tokens after the sinks)."""
        return self.keys.shape[-2] - self.n_sinks

    def _flush(self):
        """Moves whole groups from the residual window into the packed store, keeping at least
        `residual_length` full-precision tokens."""
        groups = (self.residual_tokens() - self.residual_length) // self.group_size
        if groups <= 0:
            return
        s, n = self.n_sinks, groups * self.group_size
        fresh = quantize_kv(self.keys[..., s:s + n, :], self.values[..., s:s + n, :], self.bits, self.group_size,
                            check_values=False, key_clip=self.key_clip)
        self.packed = PackedKV(*(torch.cat([old, new], dim=2) for old, new in zip(self.packed.tensors(),
                                                                                 fresh.tensors())),
                               self.bits, self.group_size)
        self.keys, self.values = (torch.cat([x[..., :s, :], x[..., s + n:, :]], dim=-2)
                                  for x in (self.keys, self.values))

    def rotated(self, x, inverse=False):
        """x in the stored basis (x R), or back from it (x R^T); the identity without rotation."""
        if self.rotation is None:
            return x
        r = self.rotation.T if inverse else self.rotation
        return (x.float() @ r).to(x.dtype)

    def dequantized(self):
        """(keys, values) of every cached token, the packed ones dequantized, in the cache dtype."""
        p, s = self.packed, self.n_sinks
        keys, values = naive.full_cache(*p.tensors(), self.keys[..., s:, :], self.values[..., s:, :], p.bits,
                                        p.group_size, self.dtype)
        keys = torch.cat([self.keys[..., :s, :], keys], dim=-2)
        values = torch.cat([self.values[..., :s, :], values], dim=-2)
        return self.rotated(keys, inverse=True), self.rotated(values, inverse=True)

    def get_seq_length(self):
        return self.cumulative_length

    def nbytes(self):
        """Bytes held: packed codes, scales and zero points, plus the sinks and the residual window."""
        if not self.is_initialized:
            return 0
        return self.packed.nbytes() + self.keys.nbytes + self.values.nbytes

    def crop(self, tokens_to_remove):
        raise NotImplementedError("QuantizedKVLayer cannot be cropped (packed tokens are not addressable)")

    def reorder_cache(self, beam_idx):
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            self.keys, self.values = self.keys[beam_idx], self.values[beam_idx]
            self.packed = PackedKV(*(t[beam_idx] for t in self.packed.tensors()), self.bits, self.group_size)

    def batch_repeat_interleave(self, repeats):
        if self.is_initialized:
            self.reorder_cache(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices):
        self.reorder_cache(indices)


class QuantizedKVCache(Cache):
    """KIVI-quantized KV cache (keys per channel, values per token; int4 or int2) for `generate`.

    `config`: the model's config; full-attention layers are packed, sliding-window ones keep
    transformers' own layers. Without a config every layer is packed, created as it is first used.
    `packed_attention` (default: whether the config selects `engram_packed_kv`; False without a
    config) makes decode steps use the fused attention; False returns dequantized states instead,
    which every attention implementation reads correctly. With True on a model whose attention is not
    `engram_packed_kv`, the next decode step raises (the step before attended to its own tokens only).
    Cannot be cropped (assisted generation); `reset()` empties it for reuse.
    """

    def __init__(self, config=None, bits=4, group_size=64, residual_length=128, packed_attention=None,
                 sink_length=16, key_clip=None, rotate=False):
        if packed_attention is None:
            packed_attention = getattr(config, "_attn_implementation", None) == ATTENTION_NAME
        make = functools.partial(QuantizedKVLayer, bits, group_size, residual_length, packed_attention, sink_length,
                                 key_clip, rotate)
        make()  # validates the arguments now rather than at the first forward
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        if config is None:
            super().__init__(layer_class_to_replicate=make)
            return
        text_config = config.get_text_config(decoder=True)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        checks.check_format("QuantizedKVCache", head_dim, bits, group_size)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers = [make() if kind == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[kind](**layer_kwargs)
                  for kind in layer_types]
        super().__init__(layers=layers)

    def nbytes(self):
        return sum(layer.nbytes() if isinstance(layer, QuantizedKVLayer) else
                   sum(t.nbytes for t in (layer.keys, layer.values) if t is not None) for layer in self.layers)

    def bytes_per_token(self):
        tokens = self.get_seq_length()
        return self.nbytes() / tokens if tokens else 0.0


def packed_kv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function for transformers' AttentionInterface: reads the packed cache when `key`
    comes from a QuantizedKVLayer; anything else (the prompt, other layers) goes to SDPA."""
    layer = getattr(key, _LAYER_ATTR, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer._unread = False
    q_len, kv_len = query.shape[2], layer.get_seq_length()
    unusual_mask = attention_mask is not None and not _plain_causal(attention_mask, q_len, kv_len)
    # With sinks, the new tokens must all still be in the residual window to come last (see full_precision).
    out_of_order = layer.n_sinks > 0 and q_len > layer.residual_tokens()
    if unusual_mask or out_of_order:  # the same numbers from the dequantized cache
        keys, values = layer.dequantized()
        if attention_mask is None:
            attention_mask = naive.causal_mask(q_len, kv_len, query.device)[None, None]
        return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = decode_attention(layer.rotated(query), layer.packed, *layer.full_precision(), scale=scaling,
                           check_values=False)
    return layer.rotated(out, inverse=True).transpose(1, 2).contiguous(), None


def default_key_clip(bits):
    """0.7 for int2 (measured in scripts/kv_quality.py), 1.0 (plain min/max) for int4."""
    return 0.7 if bits == 2 else 1.0


@functools.lru_cache(maxsize=None)
def hadamard_rotation(dim, device, seed=0):
    """An orthogonal (dim, dim) fp32 matrix that spreads every channel over all others: a normalized
    Hadamard matrix with random column signs when dim is a power of two, else a random orthogonal one.
    Built once per (dim, device, seed) and shared by every layer; read-only."""
    gen = torch.Generator().manual_seed(seed)
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (dim,), generator=gen) * 2 - 1
        r = h * signs / math.sqrt(dim)
    else:
        r, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    return r.to(device)


def _plain_causal(mask, q_len, kv_len):
    """Whether a boolean (B, 1, Tq, L) mask is just the causal pattern of the newest Tq tokens
    (chunked decoding and prefill against a cache get one), which the packed kernel applies itself."""
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False
    return bool(torch.equal(mask, naive.causal_mask(q_len, kv_len, mask.device).expand_as(mask)))


def register_packed_kv_attention():
    """Registers `engram_packed_kv` with transformers (attention and mask functions)."""
    AttentionInterface.register(ATTENTION_NAME, packed_kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def enable_packed_kv_attention(model):
    """Selects the packed-cache attention on `model` (SDPA for everything but packed decode steps)."""
    model.set_attn_implementation(register_packed_kv_attention())
    return model
