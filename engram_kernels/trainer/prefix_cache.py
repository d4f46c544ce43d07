"""Serve the hidden states below the lowest memory layer from a cache while the memory trains.

Every block below the lowest memory layer is frozen and reads no memory, so the hidden states that
enter that layer are the same in every epoch. They are computed once per sequence and kept; every
forward then skips those blocks. With right padding and causal attention a sequence's states do not
depend on the batch it is in, so they are kept per sequence, keyed by its tokens.
"""
import torch

from ..integrations.hf import decoder_layers, memory_layers


class _Filled(Exception):
    """Ends a fill forward at the memory layer: nothing above it is needed."""


class PrefixCache:
    """Context manager: inside it, a right-padded `model(input_ids=..., attention_mask=...)` call
    first runs the blocks below the lowest memory layer on the rows it has not seen (only those),
    then the whole batch from the memory layer up on the kept states. Calls with a KV cache or left
    padding, and rows past `max_bytes` of kept states, run in full."""

    def __init__(self, model, max_bytes=1 << 30):
        self.model, self.max_bytes = model, max_bytes
        self.blocks = decoder_layers(model)
        self.first = min(memory_layers(model), default=0)
        embedding = model.get_input_embeddings().weight  # the residual stream's width and dtype
        self.token_bytes = embedding.shape[1] * embedding.element_size()
        self.states, self.bytes = {}, 0
        self.rows, self.ready = None, None  # the rows a fill computes; the call's rows when all are kept
        self.enabled, self.filling = True, False
        self.hits = self.misses = 0  # calls served from kept states / run in full
        self._hooks = []

    def __enter__(self):
        if self.first == 0:
            return self
        # prepended: a fill runs inside this hook, before the n-gram memory's hook hands over the call's tokens
        self._hooks = [self.model.register_forward_pre_hook(self._see_call, with_kwargs=True, prepend=True),
                       self.blocks[self.first].register_forward_pre_hook(self._at_memory, with_kwargs=True)]
        for block in self.blocks[:self.first]:
            block.forward = self._skipping(block.forward)
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for block in self.blocks[:self.first]:
            block.__dict__.pop("forward", None)
        self.ready = None
        return False

    def _see_call(self, model, args, kwargs):
        self.ready = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.filling or not self.enabled or ids is None or kwargs.get("past_key_values") is not None:
            return
        rows = _row_keys(ids, kwargs.get("attention_mask"))
        if rows is None:
            return
        missing = list(dict.fromkeys(key for key in rows if key not in self.states))
        if missing and self.bytes + sum(map(len, missing)) * self.token_bytes <= self.max_bytes:
            self._fill(missing, ids.device)
        if self.enabled and all(key in self.states for key in rows):
            self.ready = rows

    @torch.no_grad()
    def _fill(self, keys, device):
        ids = torch.zeros(len(keys), max(map(len, keys)), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, key in enumerate(keys):
            ids[row, :len(key)] = torch.tensor(key)
            mask[row, :len(key)] = 1
        self.rows, self.filling = keys, True
        try:
            self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        except _Filled:
            pass
        finally:
            self.rows, self.filling = None, False

    def _skipping(self, forward):
        def skip_when_kept(*args, **kwargs):
            if self.ready is not None:
                return args[0] if args else kwargs["hidden_states"]
            out = forward(*args, **kwargs)
            if not isinstance(out, torch.Tensor):  # a block that returns a tuple: never skip it
                self.enabled = False
            return out
        return skip_when_kept

    def _at_memory(self, block, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.filling:
            if self.enabled:
                for row, key in enumerate(self.rows):
                    self.states[key] = hidden[row, :len(key)].detach().clone()
                    self.bytes += len(key) * self.token_bytes
            raise _Filled
        if self.ready is None:
            self.misses += 1
            return None
        self.hits += 1
        kept = torch.zeros_like(hidden)
        for row, key in enumerate(self.ready):
            kept[row, :len(key)] = self.states[key]
        return ((kept, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": kept})


def _row_keys(ids, mask):
    """Each row's tokens (without padding) as a tuple; None unless the batch is right-padded."""
    if mask is None:
        mask = torch.ones_like(ids)
    lengths = mask.sum(1)
    if not torch.equal(mask.bool(), torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]):
        return None
    return [tuple(row[:n].tolist()) for row, n in zip(ids, lengths.tolist())]
