"""Background text: what the model writes on its own, and what a fresh memory learns from it.

One sample of the model's own text (free writing, and questions it asks and answers itself) serves
three ends:
  * calibrating a fresh memory's addressing (queries centered and whitened on its activations, so
    different content reads different slots: ProductKeyMemory.calibrate_queries);
  * background slot counts, against which TF-IDF ranks a batch's slots (slots.py);
  * replay examples mixed into training batches.
No dataset is needed, and each result is cached.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..integrations import add_memory_layers, calibrate_memory_queries, memory_layers
from .dreaming import Example, prompt_ids
from .learn import encode, pad_batch, target_slot_counts
from .slots import BackgroundCounts

# Generic writing, and the short factual answers a chat model gives all day (slots that such
# answers read are in constant use, so they must rank low and, with replay, stay put).
# "" means: start from BOS and let the model ramble.
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
# How questions start, whatever they are about. The model continues QUESTION_FRAME + a start into a
# question and then answers it: questions are what a learn's questions share with every other one
# ("Which", "Who was", "?", the chat template around them), so those slots must count as background.
QUESTION_FRAME = "Quiz question: "
QUESTION_STARTS = ("Who", "Who was", "What", "What is", "Which", "Where", "When", "How many", "How", "In which",
                   "In what year", "Why", "Name the")
# Name eval's caches of sampled text, so that a changed prompt or question start samples anew.
PROMPTS_KEY = hashlib.sha256("\n".join(BACKGROUND_PROMPTS).encode()).hexdigest()[:12]
QUESTIONS_KEY = hashlib.sha256("\n".join((QUESTION_FRAME, *QUESTION_STARTS)).encode()).hexdigest()[:8]
MAX_LEN = 128  # tokens of prompt + text per example, as training encodes them


def _as_examples(records):
    return [Example(r["prompt"], r["target"], "raw", "background", "") for r in records]


def _sample(model, tokenizer, prompts, max_new_tokens):
    """Nucleus-sampled continuations (decoded, stripped) of token id lists, left-padded in one batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = pad_batch(prompts, pad_id, next(model.parameters()).device, left=True)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1]:]]


def _free_text(model, tokenizer, n_sequences, seq_len):
    records = []
    for index, prompt in enumerate(BACKGROUND_PROMPTS):
        count = n_sequences // len(BACKGROUND_PROMPTS) + (index < n_sequences % len(BACKGROUND_PROMPTS))
        if count:
            texts = _sample(model, tokenizer, [prompt_ids(tokenizer, prompt)] * count, seq_len)
            records += [{"prompt": prompt, "target": text} for text in texts if text]
    return records


def question_of(start, continuation):
    """The question `start` + `continuation` begins with, up to its first "?"; None without one."""
    text = start + (continuation if continuation[:1] in "',;:?" else f" {continuation}")
    return text[:text.index("?") + 1] if "?" in text else None


def _questions(model, tokenizer, n_questions, seq_len):
    """Up to n_questions questions the model writes from QUESTION_STARTS, each with its own answer."""
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    starts = [QUESTION_STARTS[i % len(QUESTION_STARTS)] for i in range(n_questions)]
    frames = [start + tokenizer(QUESTION_FRAME + s, add_special_tokens=False).input_ids for s in starts]
    questions = [q for q in map(question_of, starts, _sample(model, tokenizer, frames, 32)) if q]
    if not questions:
        return []
    answers = _sample(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions], seq_len)
    return [{"prompt": q, "target": a} for q, a in zip(questions, answers) if a]


@torch.no_grad()
def sample_background(model, tokenizer, n_sequences=32, seq_len=64, seed=0, cache_path=None, n_questions=0):
    """`n_sequences` texts of up to `seq_len` tokens the model writes from BOS and from
    BACKGROUND_PROMPTS, and up to `n_questions` questions it writes (QUESTION_STARTS; those without a
    question mark are dropped) with its answers of up to `seq_len` tokens, all as "raw" examples
    (prompt, text). Nucleus sampling, seeded without touching the caller's RNG. Cached as JSON at
    `cache_path`, which should name the settings."""
    if n_sequences < 1 or seq_len < 1 or n_questions < 0:
        raise ValueError(f"n_sequences and seq_len must be positive and n_questions not negative, got "
                         f"{n_sequences}, {seq_len} and {n_questions}")
    if cache_path and Path(cache_path).is_file():
        return _as_examples(json.loads(Path(cache_path).read_text()))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            records = _free_text(model, tokenizer, n_sequences, seq_len)
            if n_questions:
                records += _questions(model, tokenizer, n_questions, seq_len)
    finally:
        model.train(was_training)
    if cache_path:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{cache_path}.tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, cache_path)  # a crash never leaves a half-written cache
    return _as_examples(records)


def calibrate_addressing(model, tokenizer, examples, batch_size=16):
    """Center and whiten every memory's queries on its inputs over `examples` (every token of
    prompt and text). For fresh memories only: it changes which slots each token reads."""
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, e, MAX_LEN).ids for e in examples]
    batches = (pad_batch(encoded[i:i + batch_size], tokenizer.pad_token_id, device)
               for i in range(0, len(encoded), batch_size))
    calibrate_memory_queries(model, batches)


def _fingerprint(model, examples, write_at="answer"):
    """Hash of what decides the counts: base model id, memory configs, addressing weights, the
    text, which positions count."""
    digest = hashlib.sha256(str(getattr(model.config, "_name_or_path", "")).encode())
    if write_at != "answer":
        digest.update(b"question")
    for layer, memory in sorted(memory_layers(model).items()):
        digest.update(f"{layer}:{json.dumps(memory.config(), sort_keys=True)}".encode())
        for name, t in sorted(memory.state_dict().items()):
            if name != "values":  # everything that decides which slots a token reads
                digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([[e.prompt, e.target] for e in examples]).encode())
    return digest.hexdigest()


def _load_counts(path, model, fingerprint):
    """The cached counts when `path` holds counts with this fingerprint, else None (also for an
    unreadable file: the counts are then recomputed and the file rewritten)."""
    if not path or not os.path.exists(path):
        return None
    memories = memory_layers(model)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint or sorted(f.keys()) != sorted(f"layer.{i}" for i in memories):
                return None
            counts = {i: f.get_tensor(f"layer.{i}").to(m.values.device) for i, m in memories.items()}
    except (OSError, SafetensorError):
        return None
    if any(c.numel() != memories[i].n_slots for i, c in counts.items()):
        return None
    return BackgroundCounts(counts, int(meta["tokens"]), int(meta["n_sequences"]))


def _save_counts(path, background, fingerprint):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"fingerprint": fingerprint, "tokens": str(background.tokens), "n_sequences": str(background.n_sequences)}
    tmp = f"{path}.tmp"
    save_file({f"layer.{i}": c.cpu().contiguous() for i, c in background.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def background_counts(model, tokenizer, examples, cache_path=None, write_at="answer"):
    """Slot reads on background `examples` ({layer: int64 counts}, a BackgroundCounts whose
    `.tokens` is the number of tokens counted), counted as a learn counts its batches: where a text
    token is predicted and, unless `write_at` (LearnConfig.write_at) is "answer", at the prompts' own
    tokens too: slots that ordinary text reads anywhere rank low however a learn counts its own.
    With `cache_path`, saved there as safetensors and reused while the memory lookup (model id,
    memory configs, addressing weights), the text and the positions counted are the same."""
    if not examples:
        raise ValueError("background_counts needs at least one background example")
    fingerprint = _fingerprint(model, examples, write_at)
    cached = _load_counts(cache_path, model, fingerprint)
    if cached is not None:
        return cached
    counts, tokens = target_slot_counts(model, tokenizer, examples, MAX_LEN,
                                        write_at="answer" if write_at == "answer" else "both")
    background = BackgroundCounts(counts, tokens, len(examples))
    if cache_path:
        _save_counts(cache_path, background, fingerprint)
    return background


def add_calibrated_memory(model, tokenizer, background, layers=None, calibrate=True, **memory_config):
    """Add fresh memory layers (add_memory_layers) and, unless `calibrate` is False, calibrate their
    addressing on the `background` examples. Seed torch first: the keys and query projection are
    drawn at random and are part of the memory's identity. Returns the model."""
    add_memory_layers(model, layers=layers, **memory_config)
    if calibrate:
        calibrate_addressing(model, tokenizer, background)
    return model
