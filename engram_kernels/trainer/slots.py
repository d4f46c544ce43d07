"""Which memory slots may change: access counts, background usage, TF-IDF ranking.

Sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"):
per batch, count how often each memory slot is read; rank the read slots by TF-IDF against how
often the same slots are read on background text; only the top-t slots of each layer are updated.
Slots that background text reads all the time hold general knowledge and rank low; slots the new
batch reads often but background text rarely are specific to the new data and rank high.
"""
import hashlib
import json
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..integrations.hf import memory_layers
from .dreaming import prompt_ids

# Prompts for background text: generic writing, and the short factual answers a chat model gives
# all day (slots that such answers read are in constant use, so they must rank low and, with
# replay, stay put). "" means: start from BOS and let the model ramble.
BACKGROUND_PROMPTS = (
    "",
    "Tell me a short story.",
    "Explain how something you use every day works.",
    "Write a few sentences about an event in history.",
    "Describe a place in nature.",
    "Give some advice for learning a new skill.",
    "Explain a scientific idea in simple words.",
    "What makes a good friend?",
    "Name a famous book and say who wrote it.",
    "Name a country, its capital and one fact about it.",
    "Tell me about a famous scientist or inventor and what they are known for.",
    "Name a famous painting or piece of music and who made it.",
    "Tell me about a famous landmark and where it is.",
    "Answer briefly: what is the largest planet, ocean or desert you know of?",
)
PROMPTS_KEY = hashlib.sha256("\n".join(BACKGROUND_PROMPTS).encode()).hexdigest()[:12]


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
    """{layer: int64 access counts} on background text, plus how much text that was."""

    def __init__(self, counts, tokens, n_sequences, seq_len):
        super().__init__(counts)
        self.tokens, self.n_sequences, self.seq_len = tokens, n_sequences, seq_len


def _fingerprint(model):
    """Hash of what decides which slots a token reads: base model id, memory configs, query/key weights."""
    digest = hashlib.sha256(str(getattr(model.config, "_name_or_path", "")).encode())
    for layer, memory in sorted(memory_layers(model).items()):
        digest.update(f"{layer}:{json.dumps(memory.config(), sort_keys=True)}".encode())
        for t in (memory.query.weight, memory.query_norm.weight, memory.keys1, memory.keys2):
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_cache(path, model, expected):
    """The cached counts when `path` holds counts for this model and these settings, else None
    (also for an unreadable file: the counts are then recomputed and the file rewritten)."""
    if not path or not os.path.exists(path):
        return None
    memories = memory_layers(model)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != str(v) for k, v in expected.items()):
                return None
            if sorted(f.keys()) != sorted(f"layer.{i}" for i in memories):
                return None
            counts = {i: f.get_tensor(f"layer.{i}").to(m.values.device) for i, m in memories.items()}
    except (OSError, SafetensorError):
        return None
    if any(c.numel() != memories[i].n_slots for i, c in counts.items()):
        return None
    return BackgroundCounts(counts, int(meta["tokens"]), int(meta["n_sequences"]), int(meta["seq_len"]))


def _save_cache(path, background, expected):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {k: str(v) for k, v in expected.items()}
    meta["tokens"] = str(background.tokens)
    tmp = f"{path}.tmp"
    save_file({f"layer.{i}": c.cpu().contiguous() for i, c in background.items()}, tmp, metadata=meta)
    os.replace(tmp, path)  # a crash never leaves a half-written cache


def _generated_mask(new_tokens, eos_id):
    """True for generated tokens up to and including the first eos (later ones are padding)."""
    if eos_id is None:
        return torch.ones_like(new_tokens, dtype=torch.bool)
    after_eos = (new_tokens == eos_id).long().cumsum(1) - (new_tokens == eos_id).long()
    return after_eos == 0


@torch.no_grad()
def _sample_and_count(model, tokenizer, n_sequences, seq_len, batch_size=8):
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_prompt = [n_sequences // len(BACKGROUND_PROMPTS) + (i < n_sequences % len(BACKGROUND_PROMPTS))
                  for i in range(len(BACKGROUND_PROMPTS))]
    counter = SlotCounter(model)
    for prompt, count in zip(BACKGROUND_PROMPTS, per_prompt):
        start_ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            out = model.generate(start_ids, attention_mask=torch.ones_like(start_ids), do_sample=True,
                                 temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=seq_len,
                                 num_return_sequences=n, pad_token_id=pad_id)
            in_prompt = torch.zeros_like(out, dtype=torch.bool)
            in_prompt[:, :start_ids.shape[1]] = True
            generated = torch.zeros_like(in_prompt)
            generated[:, start_ids.shape[1]:] = _generated_mask(out[:, start_ids.shape[1]:], tokenizer.eos_token_id)
            counter.token_mask = generated.flatten()  # count the model's own text, not prompts or padding
            with counter:
                model(input_ids=out, attention_mask=(in_prompt | generated).long())
    tokens = min(counter.tokens.values())
    return BackgroundCounts(counter.counts, tokens, n_sequences, seq_len)


def background_counts(model, tokenizer, *, cache_path=None, n_sequences=32, seq_len=64, seed=0):
    """Slot access counts on background text sampled from the model itself: {layer: counts}.

    The model generates `n_sequences` continuations of up to `seq_len` tokens (from BOS and from a
    few generic chat prompts, with nucleus sampling; no dataset needed); one more forward over them
    counts the slots their tokens read (prompts and padding excluded). The result is a
    BackgroundCounts dict whose `.tokens` is the number of tokens counted. With `cache_path` the
    counts are saved there as safetensors and reused while the model's memory lookup (base model
    id, memory layer configs, query and key weights) and the settings are the same.
    """
    if n_sequences < 1 or seq_len < 1:
        raise ValueError(f"n_sequences and seq_len must be positive, got {n_sequences} and {seq_len}")
    expected = {"n_sequences": n_sequences, "seq_len": seq_len, "seed": seed, "prompts": PROMPTS_KEY,
                "fingerprint": _fingerprint(model)}
    cached = _load_cache(cache_path, model, expected)
    if cached is not None:
        return cached
    devices = [next(model.parameters()).device] if next(model.parameters()).is_cuda else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):  # seed locally, leave the caller's RNG alone
            torch.manual_seed(seed)
            background = _sample_and_count(model, tokenizer, n_sequences, seq_len)
    finally:
        model.train(was_training)
    if cache_path:
        _save_cache(cache_path, background, expected)
    return background


def with_learned(background, learned, weight=1.0):
    """Background counts plus `weight` x the slot reads of already learned data ({layer: counts},
    tokens): slots that earlier facts are stored in then rank low for the next learn, as slots in
    constant background use do, so a later learn is steered away from overwriting them."""
    counts, tokens = learned
    merged = {layer: background[layer] + (weight * counts[layer].to(background[layer].device)).long()
              for layer in background}
    return BackgroundCounts(merged, int(background.tokens + weight * tokens), background.n_sequences,
                            background.seq_len)


def _check_layers(batch_counts, background):
    missing = sorted(set(batch_counts) - set(background))
    if missing:
        raise KeyError(f"no background counts for memory layers {missing}; recompute background_counts")
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


def tfidf_allow_masks(batch_counts, background, top_t, background_tokens=None):
    """{layer: bool mask (n_slots,)}: the min(top_t, slots read) slots with the highest TF-IDF among
    the slots the batch read. Ties go to the lower slot index, so the choice is deterministic."""
    if isinstance(top_t, bool) or not isinstance(top_t, int) or top_t < 0:
        raise ValueError(f"top_t must be a non-negative int, got {top_t!r}")
    scores = tfidf_scores(batch_counts, background, background_tokens)
    masks = {}
    for layer, counts in batch_counts.items():
        read = counts > 0
        ranked = torch.where(read, scores[layer], torch.full_like(scores[layer], -math.inf))
        order = torch.sort(ranked, descending=True, stable=True).indices
        mask = torch.zeros_like(read)
        mask[order[:min(top_t, int(read.sum()))]] = True
        masks[layer] = mask
    return masks

