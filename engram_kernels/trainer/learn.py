"""Sparse memory finetuning: write training examples into the memory layers of a frozen model.

Per batch: count which memory slots the batch reads where it predicts target tokens (`write_at`
"answer"), at the question's own tokens ("question": a reworded question about the same subject reads
the same slots there when they are addressed by n-grams), or both; rank them by TF-IDF against
background counts (slots.py, background.py), and let only the top-t slots of each layer change
through the fused sparse Adam step. A fresh product-key memory's addressing is calibrated on the same
background text first (background.add_calibrated_memory), so that different content reads different
slots. Only value rows train; every other weight (base and memory query/keys) stays frozen, so
backward runs only through the layers above the memory. The loss is next-token cross-entropy on target tokens,
plus optional context distillation: the base model with the source document in its prompt is the
teacher (top-k log-probs cached once per example), the model with memory without it the student.
"""
import argparse
import dataclasses
import random
import time

import torch
import torch.nn.functional as F

from ..integrations import memory_disabled, memory_layers
from ..integrations.hf import MEMORY_CLASSES
from ..optim import FusedSparseAdam
from .dreaming import prompt_ids, template_edges
from .prefix_cache import PrefixCache
from .slots import SlotCounter, tfidf_allow_masks

IGNORE = -100

# The memory layer `engram learn` and `engram eval` add. k = 4 slots per head: with the
# retrofitted layer's untrained addressing, fewer slots per token give each slot a larger softmax
# weight and overlap less between facts; on tofu_dev it learned 0.9 where k = 32 learned 0.5 in the
# same time, with no more forgetting (eval_results/README.md).
MEMORY_LAYER = dict(heads=4, k=4, n_keys=256, key_dim=256)
ADDRESSING_CHOICES = tuple(MEMORY_CLASSES)
ADDRESSING_HELP = ("how tokens find memory slots: product_keys (by the hidden state) or ngram (by hashed 1-3-grams "
                   "of the tokens: the same in every wording; n_keys**2 slots, --heads hash functions)")


def memory_config(addressing="product_keys", heads=4, k=4, n_keys=256, key_dim=256):
    """add_memory_layers arguments from the command line's size options (k and key_dim do not
    apply to an n-gram memory)."""
    if addressing == "ngram":
        return dict(addressing="ngram", n_slots=n_keys * n_keys, heads=heads)
    return dict(addressing=addressing, heads=heads, k=k, n_keys=n_keys, key_dim=key_dim)


WRITE_AT = ("answer", "question", "both")
WRITE_AT_HELP = ("which slot reads may be written: where answer tokens are predicted (answer), at the question's own "
                 "tokens (question: with --addressing ngram, reworded questions about the same subject read them too), "
                 "or both")


# What a learn may write, by addressing, where --write-at, --background-questions and
# --max-background-share are not given. An n-gram's rows are read wherever the n-gram occurs, so an
# n-gram memory writes only at the question's tokens, counts the model's own questions as background,
# and never writes a slot background text reads: without that, SQuAD retention fell from 0.364 to
# 0.171; with it, 0.359 (eval_results/README.md, eighth session). Facts share question words, so a
# later learn on an n-gram memory would rewrite an earlier one's rows; counting what was learned as
# background (protect_learned) kept the first of five tofu batches at 1.0 instead of 0.2.
SLOT_DEFAULTS = {"product_keys": dict(write_at="answer", background_questions=0, max_background_share=None,
                                      protect_learned=0.0),
                 "ngram": dict(write_at="question", background_questions=64, max_background_share=0.0,
                               protect_learned=1.0)}


def _non_negative(kind):
    def parse(text):
        value = kind(text)
        if not value >= 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value
    return parse


def add_slot_arguments(parser):
    """The options `engram learn` and `engram eval` share on how slots are found and which may be
    written: --addressing, --write-at (and its alias --rank-question), --max-background-share,
    --background-questions, --protect-learned. All but the first default to SLOT_DEFAULTS
    (resolve_slot_arguments)."""
    parser.add_argument("--addressing", choices=ADDRESSING_CHOICES, default="product_keys", help=ADDRESSING_HELP)
    parser.add_argument("--write-at", choices=WRITE_AT, help=WRITE_AT_HELP + " (default: answer; ngram: question)")
    parser.add_argument("--max-background-share", type=float, metavar="S",
                        help="never write slots read by more than this share of background tokens (default: no "
                             "limit; ngram: 0, only n-grams the background text never uses; 1 lifts it)")
    parser.add_argument("--background-questions", type=_non_negative(int), metavar="N",
                        help="N questions the model writes and answers itself, added to the background text, so "
                             "the words every question shares (\"Which\", \"Who was\", \"?\") rank as common "
                             "(default: 0; ngram: 64)")
    parser.add_argument("--protect-learned", type=_non_negative(float), metavar="W",
                        help="count the slot reads of everything learned before (earlier memory versions; in eval, "
                             "earlier --sequential batches) W times into the background, so a learn ranks those slots "
                             "low (with --max-background-share 0: never writes them) (default: 0, off; ngram: 1)")
    parser.add_argument("--rank-question", dest="write_at", action="store_const", const="both",
                        help="the same as --write-at both (kept for recorded commands)")


def resolve_slot_arguments(args, addressing):
    """Set the slot options left out on the command line (None) to SLOT_DEFAULTS[addressing]."""
    for name, value in SLOT_DEFAULTS[addressing].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


@dataclasses.dataclass
class LearnConfig:
    top_t: int = 4096          # slots per memory layer allowed to change per batch
    lr: float = 1.0             # Adam on value rows: a row moves about lr per step; zero-init rows need large steps
    epochs: int = 15
    batch_size: int = 8
    max_len: int = 128
    distill_weight: float = 0.0  # weight of the context-distillation KL; 0 turns it off
    distill_top_k: int = 32      # teacher log-probs kept per target token
    replay_per_batch: int = 2    # background (replay) examples added to every batch, when replay is given
    write_at: str = "answer"     # which slot reads rank and may be written (WRITE_AT; see train_memory)
    max_background_share: float = None  # never write slots more background tokens read (slots.tfidf_allow_masks)
    seed: int = 0


@dataclasses.dataclass
class Encoded:
    ids: list          # student tokens: prompt + target
    target_start: int  # index of the first target token in ids
    question: tuple = (0, 0)  # [start, end) of the prompt's own text in ids (no chat template)
    teacher_ids: list = None
    teacher_target_start: int = 0


def encode(tokenizer, example, max_len, with_teacher=False):
    """Token ids of prompt + target (+ eos), truncated to max_len, and where the target starts."""
    target = tokenizer(example.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    full = prompt_ids(tokenizer, example.prompt)
    prompt = full[-(max_len // 2):]
    ids = (prompt + target)[:max_len]
    encoded = Encoded(ids, len(prompt))
    if example.prompt:
        before, after = template_edges(tokenizer)
        cut = len(full) - len(prompt)
        encoded.question = (max(0, before - cut), min(len(ids), max(0, len(full) - after - cut)))
    if with_teacher:
        teacher_prompt = prompt_ids(tokenizer, f"{example.context}\n\n{example.prompt}".strip())
        teacher_prompt = teacher_prompt[-(2 * max_len):]
        encoded.teacher_ids, encoded.teacher_target_start = teacher_prompt + ids[len(prompt):], len(teacher_prompt)
    return encoded


def pad_batch(sequences, pad_id, device, left=False):
    """Right-padded (left-padded, for generation, with `left`) (ids, attention mask) for a list of
    token id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        at = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, at] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, at] = 1
    return ids, mask


def target_labels(batch, ids):
    """Labels that score only target tokens (prompt and padding are IGNORE)."""
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(batch):
        labels[i, e.target_start:len(e.ids)] = ids[i, e.target_start:len(e.ids)]
    return labels


def predicts_target(batch, ids):
    """(B, T) bool: positions whose output predicts a target token (position p predicts token p+1)."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :-1] = target_labels(batch, ids)[:, 1:] != IGNORE
    return mask


def countable(batch, predicting, write_at="answer"):
    """(B, T) bool: the positions whose slot reads rank: `predicting` (predicts_target) for
    `write_at` "answer", the tokens of each prompt's own text for "question" (the chat template's
    tokens never count), both for "both"."""
    if write_at not in WRITE_AT:
        raise ValueError(f"write_at must be one of {WRITE_AT}, got {write_at!r}")
    if write_at == "answer":
        return predicting
    mask = predicting.clone() if write_at == "both" else torch.zeros_like(predicting)
    for i, e in enumerate(batch):
        mask[i, e.question[0]:e.question[1]] = True
    return mask


def _labelled_cross_entropy(logits, labels, reduction="mean"):
    """(loss, mask) of (B, T, V) logits at the positions whose label is not IGNORE, taken as
    contiguous (N, V) rows: cross_entropy over the (B, V, T) transpose runs a strided softmax
    (~20x slower on CPU) over every position, ignored ones included. The mean of no positions is 0."""
    keep = labels != IGNORE
    losses = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    return (losses if reduction == "none" else losses.sum() / keep.sum().clamp(min=1)), keep


def target_token_losses(logits, batch, ids):
    """Next-token cross-entropy per position, (B, T-1), zero where not a target token."""
    labels = target_labels(batch, ids)[:, 1:]
    losses, keep = _labelled_cross_entropy(logits[:, :-1], labels, reduction="none")
    return torch.zeros(labels.shape, device=losses.device, dtype=losses.dtype).masked_scatter(keep, losses)


def target_loss(logits, batch, ids):
    """Mean next-token cross-entropy over the batch's target tokens."""
    return _labelled_cross_entropy(logits[:, :-1], target_labels(batch, ids)[:, 1:])[0]


@torch.no_grad()
def teacher_targets(model, tokenizer, encoded, top_k, batch_size=8):
    """Per example: (ids (T, top_k), log-probs (T, top_k)) of the base model with the document in
    its prompt, at the positions predicting each target token. Computed once, kept on CPU."""
    device = next(model.parameters()).device
    cache = []
    with memory_disabled(model):
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            ids, mask = pad_batch([e.teacher_ids for e in batch], tokenizer.pad_token_id, device)
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for i, e in enumerate(batch):
                span = logp[i, e.teacher_target_start - 1:len(e.teacher_ids) - 1]
                top = span.topk(top_k, dim=-1)
                cache.append((top.indices.cpu(), top.values.cpu()))
    return cache


def _distill_loss(logits, batch, teachers):
    """KL(teacher || student) on the teacher's top-k support, renormalized, over target tokens."""
    losses = []
    for i, (e, (t_ids, t_logp)) in enumerate(zip(batch, teachers)):
        span = logits[i, e.target_start - 1:len(e.ids) - 1].float().log_softmax(-1)
        n = min(len(span), len(t_ids))
        student = span[:n].gather(-1, t_ids[:n].to(span.device))
        teacher = t_logp[:n].to(span.device).log_softmax(-1)
        losses.append((teacher.exp() * (teacher - student.log_softmax(-1))).sum(-1).mean())
    return torch.stack(losses).mean()


def target_position_loss(model, ids, mask, batch, predicting=None):
    """target_loss with the vocabulary projection run only at the positions that predict a target
    token: over every position it is a fifth of a small model's forward, and a batch's targets are
    often under half of its positions. The output head sees those positions' hidden states as one
    (N, D) matrix (a pre-hook), so any elementwise logit post-processing of the model still applies."""
    if predicting is None:
        predicting = predicts_target(batch, ids)
    columns = predicting.any(0).nonzero().squeeze(1)
    at_targets = predicting[:, columns]
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][at_targets],))
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=columns).logits
    finally:
        hook.remove()
    labels = target_labels(batch, ids)[:, columns + 1][at_targets]
    if not labels.numel():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def target_slot_counts(model, tokenizer, examples, max_len=128, batch_size=8, write_at="answer"):
    """({layer: slot reads}, tokens counted) at the positions of `examples` that `write_at` says
    (countable): the slots a learn on them may write (slots.with_learned)."""
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, e, max_len) for e in examples]
    with SlotCounter(model) as counter:
        for first in range(0, len(encoded), batch_size):
            batch = encoded[first:first + batch_size]
            ids, mask = pad_batch([e.ids for e in batch], tokenizer.pad_token_id, device)
            counter.token_mask = countable(batch, predicts_target(batch, ids), write_at).flatten()
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    return counter.counts, min(counter.tokens.values(), default=0)


def _train_values_only(model):
    for p in model.parameters():
        p.requires_grad_(False)
    values = [m.values for m in memory_layers(model).values()]
    for v in values:
        v.requires_grad_(True)
    return values


@dataclasses.dataclass
class LearnStats:
    examples: int = 0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    rows_changed: dict = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_s(self):
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self):
        return {**dataclasses.asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def _batches(encoded, replayed, config):
    """(indices into `encoded`, the batch's examples: those, then config.replay_per_batch of
    `replayed`) for every step of config.epochs, shuffled with config.seed."""
    order, rng = list(range(len(encoded))), random.Random(config.seed)
    for _ in range(config.epochs):
        rng.shuffle(order)
        for first in range(0, len(order), config.batch_size):
            picked = order[first:first + config.batch_size]
            batch = [encoded[i] for i in picked]
            if replayed:
                batch += rng.sample(replayed, min(config.replay_per_batch, len(replayed)))
            yield picked, batch


def _loss_and_slot_reads(model, ids, mask, batch, new_rows, config, teachers):
    """(the batch's loss, {layer: slot reads of its first `new_rows` rows where config.write_at says})."""
    predicting = predicts_target(batch, ids)
    with SlotCounter(model) as counter:
        # Only the slots read where config.write_at says (a target token is predicted, the
        # question's own tokens) rank. The chat template's positions, read by every question,
        # would otherwise top the ranking and their shared slots be rewritten.
        is_new = torch.arange(len(batch), device=ids.device)[:, None] < new_rows
        counter.token_mask = (countable(batch, predicting, config.write_at) & is_new).flatten()
        if config.distill_weight > 0:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = target_loss(logits, batch, ids) + config.distill_weight * _distill_loss(logits, batch, teachers)
        else:
            loss = target_position_loss(model, ids, mask, batch, predicting)
    return loss, counter.counts


def train_memory(model, tokenizer, examples, background, config=LearnConfig(), progress=None, replay=None):
    """Train the memory values of `model` on `examples`; returns LearnStats. `background` is
    {layer: access counts} from background.background_counts; `progress(step, total, loss, tok_per_s)`.

    `replay`: examples of background text (the model's own) of which config.replay_per_batch join
    every batch. Their slot reads do not rank; their loss pulls back allowed slots that also serve
    background text, so interference is trained away where it happens."""
    if not memory_layers(model):
        raise ValueError("model has no memory layers: add_memory_layers(model, ...) first")
    device = next(model.parameters()).device
    distill = config.distill_weight > 0
    encoded = [encode(tokenizer, e, config.max_len, with_teacher=distill) for e in examples]
    replayed = [encode(tokenizer, e, config.max_len) for e in replay or ()] \
        if config.replay_per_batch and not distill else []
    teachers = teacher_targets(model, tokenizer, encoded, config.distill_top_k) if distill else [None] * len(encoded)
    values = _train_values_only(model)
    optimizer = FusedSparseAdam(values, lr=config.lr)
    layers = memory_layers(model)
    before = {layer: m.values.detach().clone() for layer, m in layers.items()}
    total = config.epochs * -(-len(encoded) // config.batch_size)
    stats, start = LearnStats(examples=len(examples)), time.perf_counter()
    model.train()
    with PrefixCache(model):  # the blocks below the memory run once per sequence
        for picked, batch in _batches(encoded, replayed, config):
            ids, mask = pad_batch([e.ids for e in batch], tokenizer.pad_token_id, device)
            loss, counts = _loss_and_slot_reads(model, ids, mask, batch, len(picked), config,
                                                [teachers[i] for i in picked])
            masks = tfidf_allow_masks(counts, background, config.top_t,
                                      max_background_share=config.max_background_share)
            for layer, memory in layers.items():
                optimizer.set_allow_mask(memory.values, masks[layer].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.tokens += int(mask.sum())
            stats.final_loss = loss.item()
            stats.seconds = time.perf_counter() - start
            if progress is not None:
                progress(stats.steps, total, stats.final_loss, stats.tokens_per_s)
    model.eval()
    for v in values:
        v.requires_grad_(False)
    stats.rows_changed = {str(layer): int((m.values.detach() != before[layer]).any(1).sum())
                          for layer, m in layers.items()}
    return stats
