"""Which memory slots may change: access counts, background usage, TF-IDF ranking.

Sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"):
per batch, count how often each memory slot is read; rank the read slots by TF-IDF against how
often the same slots are read on background text; only the top-t slots of each layer are updated.
Slots that background text reads all the time hold general knowledge and rank low; slots the new
batch reads often but background text rarely are specific to the new data and rank high.
"""
import math

import torch

from ..integrations.hf import memory_layers


class SlotCounter:
    """Context manager counting memory-slot reads of every forward inside it, per memory layer.

    `counts` is {decoder layer: int64 tensor (n_slots,)} on the memory's device; `tokens` is
    {layer: tokens counted}. Set `token_mask` (bool, one entry per flattened token of the next
    forwards, e.g. attention_mask.flatten()) to count only some tokens, such as non-padding ones.
    Every forward counts, so gradient checkpointing (which reruns forwards) counts twice.
    """

    def __init__(self, model):
        self.memories = memory_layers(model)
        if not self.memories:
            raise ValueError("model has no memory layers: add_memory_layers(model, ...) first")
        self.token_mask = None
        self._hooks = {}
        self.reset()

    def reset(self):
        self.counts = {layer: torch.zeros(m.n_slots, dtype=torch.int64, device=m.values.device)
                       for layer, m in self.memories.items()}
        self.tokens = {layer: 0 for layer in self.memories}

    def _record(self, layer, ids):
        if self.token_mask is not None:
            mask = self.token_mask.reshape(-1).to(device=ids.device, dtype=torch.bool)
            if mask.numel() != ids.shape[0]:
                raise ValueError(f"token_mask has {mask.numel()} entries but the forward has {ids.shape[0]} tokens")
            ids = ids[mask]
        counts = self.counts[layer]
        counts += torch.bincount(ids.reshape(-1), minlength=counts.numel()).to(counts.device)
        self.tokens[layer] += ids.shape[0]

    def __enter__(self):
        if self._hooks:
            raise RuntimeError("SlotCounter is already active")
        for layer, memory in self.memories.items():
            hook = (lambda ids, layer=layer: self._record(layer, ids))
            memory.access_hooks.append(hook)
            self._hooks[layer] = hook
        return self

    def __exit__(self, *exc):
        for layer, hook in self._hooks.items():
            hooks = self.memories[layer].access_hooks
            hooks[:] = [h for h in hooks if h is not hook]
        self._hooks = {}
        return False


class BackgroundCounts(dict):
    """{layer: int64 access counts} on background text, plus how many tokens and examples that was."""

    def __init__(self, counts, tokens, n_sequences=0):
        super().__init__(counts)
        self.tokens, self.n_sequences = tokens, n_sequences


def with_learned(background, learned, weight=1.0):
    """Background counts plus `weight` x the slot reads of already learned data ({layer: counts},
    tokens): slots that earlier facts are stored in then rank low for the next learn, as slots in
    constant background use do, so a later learn is steered away from overwriting them."""
    counts, tokens = learned
    merged = {layer: background[layer] + (weight * counts[layer].to(background[layer].device)).long()
              for layer in background}
    return BackgroundCounts(merged, int(background.tokens + weight * tokens), background.n_sequences)


def _check_layers(batch_counts, background):
    missing = sorted(set(batch_counts) - set(background))
    if missing:
        raise KeyError(f"no background counts for memory layers {missing}; recompute background.background_counts")
    for layer, counts in batch_counts.items():
        if counts.shape != background[layer].shape:
            raise ValueError(f"layer {layer}: batch counts of shape {tuple(counts.shape)} but background "
                             f"counts of shape {tuple(background[layer].shape)}")


def tfidf_scores(batch_counts, background, background_tokens=None):
    """{layer: float32 TF-IDF score per slot}; slots the batch did not read score 0.

    tf(i)  = batch reads of slot i / all batch reads of the layer.
    idf(i) = log((N + 1) / (min(background reads of i, N) + 1)), N = background tokens.

    This is the paper's document-frequency form with each background *token* as a document: a token
    reads a slot at most once per head, so a slot's background count is (almost exactly) the number
    of background tokens that read it. Token granularity rather than sequence granularity because a
    small background (a few dozen sampled sequences) would make sequence-level document frequency
    saturate: common slots appear in every sequence, and the idf could take only a few dozen values.
    `background_tokens` defaults to `background.tokens` (BackgroundCounts), else to each layer's
    total background reads (then idf = log((total + 1) / (count + 1))).
    """
    _check_layers(batch_counts, background)
    if background_tokens is None:
        background_tokens = getattr(background, "tokens", None)
    scores = {}
    for layer, counts in batch_counts.items():
        bg = background[layer].to(device=counts.device, dtype=torch.float64)
        n = float(background_tokens if background_tokens is not None else bg.sum())
        idf = math.log(n + 1) - torch.log(bg.clamp(max=n) + 1)
        total = counts.sum()
        tf = counts.double() / total if total > 0 else torch.zeros_like(idf)
        scores[layer] = (tf * idf).float()
    return scores


def tfidf_allow_masks(batch_counts, background, top_t, background_tokens=None, max_background_share=None):
    """{layer: bool mask (n_slots,)}: the min(top_t, slots read) slots with the highest TF-IDF among
    the slots the batch read. Ties go to the lower slot index, so the choice is deterministic.

    `max_background_share`: slots read by more than this share of the background tokens are never
    chosen. TF-IDF alone lets a word the batch repeats ("the", "author") outrank a name it reads once;
    an n-gram memory's slot for such a word is the same in all text, so writing it changes everything."""
    if isinstance(top_t, bool) or not isinstance(top_t, int) or top_t < 0:
        raise ValueError(f"top_t must be a non-negative int, got {top_t!r}")
    if max_background_share is not None and not 0 <= max_background_share <= 1:
        raise ValueError(f"max_background_share must be in [0, 1], got {max_background_share!r}")
    if background_tokens is None:
        background_tokens = getattr(background, "tokens", None)
    scores = tfidf_scores(batch_counts, background, background_tokens)
    masks = {}
    for layer, counts in batch_counts.items():
        read = counts > 0
        if max_background_share is not None:
            bg = background[layer].to(counts.device)
            n = background_tokens if background_tokens is not None else int(bg.sum())
            read &= bg <= max_background_share * n
        ranked = torch.where(read, scores[layer], torch.full_like(scores[layer], -math.inf))
        order = torch.sort(ranked, descending=True, stable=True).indices
        mask = torch.zeros_like(read)
        mask[order[:min(top_t, int(read.sum()))]] = True
        masks[layer] = mask
    return masks

