"""`engram eval`: teach a model the same documents by several methods on the same training-time budget,
then measure what each learned and what it forgot.

Methods (each starts from a fresh copy of the base model):
    memory       sparse memory finetuning of new memory layers (this package: learn.train_memory)
    lora         LoRA, r=32 on all linear layers, AdamW lr 1e-3: peft's (default) or, with
                 --lora-impl engram, this package's fused LoRALinear (integrations.apply_lora)
    lora_replay  the same with background text sampled from the base model mixed into every batch
    full         full fine-tuning, AdamW lr 1e-5
    rag          no training: the top-2 BM25 passages of the learned documents in the prompt
    base         the untouched model
Every training method trains on the same examples (dreaming.fallback_examples of the learned documents,
loss on target tokens) for the same wall-clock seconds: --budget-s, by default the memory method's own
training time.

Data: SQuAD-style passages `[{title, context, questions: [{question, answer}]}]` (learn the passages,
answer their questions closed-book; score: normalized gold answer contained in the answer, token F1) or
question/answer facts `[{question, answer}]` such as TOFU (learn the facts, ask their questions; score:
ROUGE-L recall of the gold answer, a question counts as answered at recall >= 0.5). Retention sets
`[{question, answer}]` are asked before and after learning and never trained on (score: contains).
"""
import collections
import copy
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import shlex
import string
import time
from pathlib import Path

import torch

from ..integrations import memory_parameters
from .background import PROMPTS_KEY, QUESTIONS_KEY, add_calibrated_memory, background_counts, sample_background
from .dreaming import fallback_examples, format_prompt
from .ingest import Document, chunk_documents
from .learn import (MEMORY_LAYER, LearnConfig, add_slot_arguments, encode, memory_config, pad_batch,
                    resolve_slot_arguments, target_position_loss, target_slot_counts, train_memory)
from .models import default_cache_dir, freeze
from .slots import with_learned

METHODS = ("memory", "lora", "lora_replay", "full", "rag", "base")
TRAINED = ("memory", "lora", "lora_replay", "full")
LORA_R, LORA_ALPHA = 32, 32
LORA_IMPLS = ("peft", "engram")
ROUGE_PASS = 0.5  # a TOFU question counts as answered at this ROUGE-L recall
RAG_TEMPLATE = "Use these passages to answer the question.\n\n{passages}\n\nQuestion: {question}"


class EvalDataError(ValueError):
    """An evaluation file that cannot be used; the message names the file."""


# ---------------------------------------------------------------- scoring

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text):
    """SQuAD normalization: lowercase, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def contains(answer, gold):
    """1.0 when the normalized gold answer occurs in the normalized answer as whole words, else 0.0."""
    gold = normalize_answer(gold)
    return float(bool(gold) and f" {gold} " in f" {normalize_answer(answer)} ")


def token_f1(answer, gold):
    """SQuAD token F1 between the normalized answer and gold answer."""
    predicted, expected = normalize_answer(answer).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _rouge_tokens(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a, b):
    """Length of the longest common subsequence of two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_recall(answer, gold):
    """ROUGE-L recall: LCS of lowercase alphanumeric tokens over the gold answer's token count."""
    expected = _rouge_tokens(gold)
    return lcs_length(_rouge_tokens(answer), expected) / len(expected) if expected else 0.0


# ---------------------------------------------------------------- data

@dataclasses.dataclass
class Question:
    question: str
    answers: tuple  # gold answers; a question's score is the best over them
    item: int = -1  # index of the learned passage or fact it asks about; -1 for retention questions


@dataclasses.dataclass
class EvalData:
    path: str
    kind: str          # "squad" (passages) or "qa" (facts)
    documents: list    # one Document per passage or fact, in file order
    questions: list    # Questions about the documents


def _read_records(path):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path}: cannot read: {error}") from None
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalDataError(f"{path}: malformed JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(records, list) or not records:
        raise EvalDataError(f"{path}: expected a non-empty JSON list of records")
    return records


def _answers(record, where):
    answer = record.get("answer", record.get("answers"))
    answers = answer if isinstance(answer, list) else [answer]
    answers = tuple(str(a).strip() for a in answers if isinstance(a, (str, int, float)) and str(a).strip())
    if not answers or not str(record.get("question", "")).strip():
        raise EvalDataError(f"{where}: needs a non-empty \"question\" and \"answer\"")
    return answers


def _limit(records, limit):
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    return records[:limit] if limit else records


def load_eval_data(path, limit=None):
    """The passages or facts to learn (the first `limit` of them) and their questions."""
    records = _limit(_read_records(path), limit)
    first = records[0] if isinstance(records[0], dict) else {}
    if "context" in first and "questions" in first:
        return _squad_data(path, records)
    if "question" in first and "answer" in first:
        return _qa_data(path, records)
    raise EvalDataError(f"{path}: records must be {{title, context, questions}} (passages) or "
                        f"{{question, answer}} (facts); the first has keys {sorted(first)}")


def _squad_data(path, records):
    documents, questions = [], []
    for index, record in enumerate(records):
        where = f"{path}: item {index}"
        if not isinstance(record, dict) or not str(record.get("context", "")).strip() \
                or not isinstance(record.get("questions"), list):
            raise EvalDataError(f"{where}: needs \"context\" text and a \"questions\" list")
        title = str(record.get("title") or "").strip()
        text = f"{title}\n\n{record['context']}" if title else record["context"]
        documents.append(Document.make(f"{path}#{index}", "text", text))
        for q in record["questions"]:
            if not isinstance(q, dict):
                raise EvalDataError(f"{where}: each question must be an object with \"question\" and \"answer\"")
            questions.append(Question(q["question"].strip(), _answers(q, where), index))
    return EvalData(str(path), "squad", documents, questions)


def _qa_data(path, records):
    documents, questions = [], []
    for index, record in enumerate(records):
        where = f"{path}: item {index}"
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}: expected an object with \"question\" and \"answer\"")
        answers = _answers(record, where)
        documents.append(Document.make(f"{path}#{index}", "qa", question=record["question"], answer=answers[0]))
        questions.append(Question(record["question"].strip(), answers, index))
    return EvalData(str(path), "qa", documents, questions)


def load_retention(path, limit=None):
    """Questions of a {question, answer} file (the first `limit`), never trained on."""
    records = _limit(_read_records(path), limit)
    questions = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}: item {index}: expected an object with \"question\" and \"answer\"")
        questions.append(Question(str(record.get("question", "")).strip(), _answers(record, f"{path}: item {index}")))
    return questions


def question_scores(kind, question, answer):
    """One question's {"hit": bool, ...}: ROUGE-L recall for "qa" (hit at >= ROUGE_PASS), contains
    and token F1 for "squad" and "retention"."""
    if kind == "qa":
        recall = max(rouge_l_recall(answer, g) for g in question.answers)
        return {"hit": recall >= ROUGE_PASS, "rouge_l": recall}
    return {"hit": bool(max(contains(answer, g) for g in question.answers)),
            "f1": max(token_f1(answer, g) for g in question.answers)}


def score_answers(kind, questions, answers):
    """{"acc", "f1"} for "squad" and "retention" (contains, token F1); {"acc", "rouge_l"} for "qa"
    (share with ROUGE-L recall >= ROUGE_PASS, mean recall); None for no questions."""
    return summarize_scores(kind, [question_scores(kind, q, a) for q, a in zip(questions, answers)])


def summarize_scores(kind, scores):
    """score_answers from the question_scores of each question; None for none."""
    if not scores:
        return None
    metric = "rouge_l" if kind == "qa" else "f1"
    return {"acc": _mean(s["hit"] for s in scores), metric: _mean(s[metric] for s in scores)}


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- BM25

def _words(text):
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a fixed list of passages (k1=1.5, b=0.75, idf = log(1 + (N - n + .5) / (n + .5)))."""

    def __init__(self, passages, k1=1.5, b=0.75):
        self.passages = list(passages)
        if not self.passages:
            raise ValueError("BM25 needs at least one passage")
        self.k1, self.b = k1, b
        self.counts = [collections.Counter(_words(p)) for p in self.passages]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.average_length = _mean(self.lengths) or 1.0
        document_frequency = collections.Counter(w for c in self.counts for w in c)
        n = len(self.passages)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in document_frequency.items()}

    def scores(self, query):
        terms = _words(query)
        scores = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.average_length)
            scores.append(sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                              for t in terms if t in counts))
        return scores

    def top(self, query, n=2):
        """Indices of the `n` best passages, best first; ties go to the earlier passage."""
        scores = self.scores(query)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


# ---------------------------------------------------------------- asking

def _eos_ids(model, tokenizer):
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=16):
    """Greedy answers to already formatted prompts, batched with left padding (prompts of similar
    length share a batch); returns (answers, prompt token counts), in the order of `prompts`."""
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    answers = [None] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    model.eval()
    for first in range(0, len(order), batch_size):
        picked = order[first:first + batch_size]
        ids, mask = pad_batch([encoded[i] for i in picked], pad_id, device, left=True)
        width = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_ids)
        for row, i in enumerate(picked):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers, [len(e) for e in encoded]


def closed_book_prompt(tokenizer, question):
    return format_prompt(tokenizer, question)


def rag_prompt(tokenizer, retriever, question, top_k=2):
    passages = "\n\n".join(retriever.passages[i] for i in retriever.top(question, top_k))
    return format_prompt(tokenizer, RAG_TEMPLATE.format(passages=passages, question=question))


# ---------------------------------------------------------------- training methods

@dataclasses.dataclass
class Trained:
    """A model ready to be asked, and what teaching it cost."""
    model: torch.nn.Module
    train_s: float = 0.0
    steps: int = 0
    tokens: int = 0
    extra_bytes: int = 0
    retriever: BM25 = None

    @property
    def tokens_per_s(self):
        return self.tokens / self.train_s if self.train_s else 0.0


class _BudgetSpent(Exception):
    pass


def _bytes(parameters):
    return sum(p.numel() * p.element_size() for p in parameters)


def fresh_memory_model(base, tokenizer, memory_config, background, layers=None, seed=0, calibrate=True,
                       counts_cache=None, write_at="answer"):
    """(copy of `base` with new memory layers, all frozen, addressing calibrated on the `background`
    examples unless `calibrate` is False; the slot counts of those examples, cached at `counts_cache`,
    counted for `write_at` as background_counts says)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # the memory's keys and query projection
    add_calibrated_memory(model, tokenizer, background, layers, calibrate, **memory_config)
    freeze(model)
    return model, background_counts(model, tokenizer, background, counts_cache, write_at)


def train_memory_method(model, counts, tokenizer, examples, config, budget_s=None, replay=None):
    """The fresh memory of `model` with its background `counts` (fresh_memory_model), trained by
    train_memory: for config.epochs, or with `budget_s` for as many epochs as fit in that many
    seconds. `replay`: background examples, config.replay_per_batch of which join each batch."""
    trained = Trained(model, extra_bytes=_bytes(memory_parameters(model)))
    if not examples:
        return trained
    if budget_s is None:
        stats = train_memory(model, tokenizer, examples, counts, config, replay=replay)
        trained.train_s, trained.steps, trained.tokens = stats.seconds, stats.steps, stats.tokens
        return trained
    return _train_memory_for(trained, tokenizer, examples, counts, config, budget_s, replay)


def _train_memory_for(trained, tokenizer, examples, counts, config, budget_s, replay=None):
    # train_memory has no time limit: its progress callback ends the loop once the budget is spent.
    seen = {"steps": 0, "tokens_per_s": 0.0}
    start = time.perf_counter()

    def progress(step, total, loss, tokens_per_s):
        seen.update(steps=step, tokens_per_s=tokens_per_s)
        if time.perf_counter() - start >= budget_s:
            raise _BudgetSpent

    try:
        train_memory(trained.model, tokenizer, examples, counts,
                     dataclasses.replace(config, epochs=10 ** 9), progress=progress, replay=replay)
    except _BudgetSpent:
        trained.model.eval()
        freeze(trained.model)
    trained.train_s = time.perf_counter() - start
    trained.steps = seen["steps"]
    trained.tokens = int(seen["tokens_per_s"] * trained.train_s)
    return trained


def train_for(model, tokenizer, examples, optimizer, config, budget_s, replay=(), replay_per_batch=0):
    """Next-token loss on the examples' target tokens, batches of config.batch_size (each plus
    `replay_per_batch` replay examples, cycled), epoch after epoch until `budget_s` seconds are
    spent. Returns (seconds, steps, tokens)."""
    encoded = [encode(tokenizer, e, config.max_len) for e in examples]
    replayed = [encode(tokenizer, e, config.max_len) for e in replay]
    device = next(model.parameters()).device
    order, rng = list(range(len(encoded))), random.Random(config.seed)
    steps = tokens = next_replay = 0
    model.train()
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        rng.shuffle(order)
        for first in range(0, len(order), config.batch_size):
            batch = [encoded[i] for i in order[first:first + config.batch_size]]
            if replayed:
                batch += [replayed[(next_replay + j) % len(replayed)] for j in range(replay_per_batch)]
                next_replay += replay_per_batch
            ids, mask = pad_batch([e.ids for e in batch], tokenizer.pad_token_id, device)
            loss = target_position_loss(model, ids, mask, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps, tokens = steps + 1, tokens + int(mask.sum())
            if time.perf_counter() - start >= budget_s:
                break
    model.eval()
    return time.perf_counter() - start, steps, tokens


def peft_available():
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def lora_model(base, impl="peft"):
    """A frozen copy of `base` with rank-LORA_R adapters on every linear layer but the head: peft's, or
    this package's fused LoRALinear (same initialization and math; saves in peft's format)."""
    if impl == "engram":
        from ..integrations import apply_lora
        return apply_lora(freeze(copy.deepcopy(base)), r=LORA_R, alpha=LORA_ALPHA, dropout=0.0)
    if impl != "peft":
        raise ValueError(f"unknown LoRA implementation {impl!r}; expected one of {LORA_IMPLS}")
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(freeze(copy.deepcopy(base)), lora)


def train_lora_method(base, tokenizer, examples, config, budget_s, lr=1e-3, replay=(), replay_per_batch=0,
                      impl="peft"):
    model = lora_model(base, impl)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    seconds, steps, tokens = train_for(model, tokenizer, examples, optimizer, config, budget_s, replay,
                                       replay_per_batch)
    freeze(model)
    return Trained(model, seconds, steps, tokens, extra_bytes=_bytes(parameters))


def train_full_method(base, tokenizer, examples, config, budget_s, lr=1e-5):
    model = copy.deepcopy(base)
    parameters = list(model.parameters())
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    seconds, steps, tokens = train_for(model, tokenizer, examples, optimizer, config, budget_s)
    freeze(model)
    return Trained(model, seconds, steps, tokens, extra_bytes=_bytes(parameters))


# ---------------------------------------------------------------- the harness

@dataclasses.dataclass
class EvalOptions:
    methods: tuple = METHODS
    budget_s: float = None           # seconds per training method; None: the memory method's own time
    learn: LearnConfig = dataclasses.field(default_factory=LearnConfig)
    memory: dict = dataclasses.field(default_factory=lambda: dict(MEMORY_LAYER))
    layers: list = None              # decoder layers for memory (None: the middle one)
    chunk_tokens: int = 256          # RAG passages, as `engram learn` chunks documents
    max_new_tokens: int = None       # None: 64 for facts (full-sentence answers), 32 for passages
    retention_max_new_tokens: int = 32
    lora_lr: float = 1e-3
    lora_impl: str = "peft"          # "engram": the fused LoRALinear of this package
    full_lr: float = 1e-5
    rag_top_k: int = 2
    answer_batch_size: int = 16
    sequential: int = 0              # K > 0: also K learns in a row on one memory
    protect_learned: float = 0.0     # sequential: earlier learns' slot reads in the background (slots.with_learned)
    background_sequences: int = 32   # background text sampled from the base model (addressing, slot counts, replay)
    background_len: int = 64
    background_questions: int = 0    # questions the base model writes and answers, added to that text
    calibrate: bool = True           # center and whiten the memory's queries on the background text
    seed: int = 0
    cache_dir: str = None            # background counts / replay text (None: default_cache_dir()/eval)


FIT_SAMPLE = 40  # training question/answer examples asked back after training (train_fit_acc)


class Harness:
    """One base model, the data, and what every method is compared on."""

    def __init__(self, base, tokenizer, data, retention, options, log=print):
        self.base, self.tokenizer, self.data, self.retention = freeze(base).eval(), tokenizer, data, retention
        self.options, self.log = options, log
        self.chunks = chunk_documents(data.documents, tokenizer, options.chunk_tokens)
        self.examples = self.training_examples(data.documents)
        self.max_new_tokens = options.max_new_tokens or (64 if data.kind == "qa" else 32)
        cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir() / "eval"
        key = hashlib.sha256(str(getattr(base.config, "_name_or_path", "")).encode()).hexdigest()[:12]
        self.counts_cache = cache / f"background-counts-{key}.safetensors"
        questions = f"-q{options.background_questions}-{QUESTIONS_KEY}" if options.background_questions else ""
        self.text_cache = (cache / f"background-text-{key}-{options.background_sequences}x{options.background_len}"
                                  f"{questions}-seed{options.seed}-{PROMPTS_KEY}.json")
        self.retention_before = None

    def training_examples(self, documents):
        """fallback_examples of the documents, cut into chunks whose "raw" example fits max_len
        (learn.encode truncates longer targets, which would drop the end of a passage)."""
        size = min(self.options.chunk_tokens, self.options.learn.max_len - 8)
        return [e for d in chunk_documents(documents, self.tokenizer, size, overlap=16) for e in fallback_examples(d)]

    # -- asking

    def ask(self, trained, questions, max_new_tokens):
        if trained.retriever is not None:
            prompts = [rag_prompt(self.tokenizer, trained.retriever, q.question, self.options.rag_top_k)
                       for q in questions]
        else:
            prompts = [closed_book_prompt(self.tokenizer, q.question) for q in questions]
        return generate_answers(trained.model, self.tokenizer, prompts, max_new_tokens, self.options.answer_batch_size)

    def score_learned(self, trained, questions=None):
        """(scores, mean prompt tokens per question, the first 3 answers, up to 5 missed ones) on the
        learned questions."""
        questions = self.data.questions if questions is None else questions
        answers, prompt_tokens = self.ask(trained, questions, self.max_new_tokens)
        scores = [question_scores(self.data.kind, q, a) for q, a in zip(questions, answers)]
        samples = [{"question": q.question, "gold": q.answers[0], "answer": a} for q, a in zip(questions, answers)]
        missed = [sample for sample, score in zip(samples, scores) if not score["hit"]]
        return summarize_scores(self.data.kind, scores), _mean(prompt_tokens), samples[:3], missed[:5]

    def score_fit(self, trained, n=FIT_SAMPLE):
        """Share of n training question/answer examples (evenly spread) the method answers: whether it
        fit what it trained on, apart from whether that carried over to the test questions."""
        qa = [e for e in self.examples if e.kind == "qa"]
        picked = qa[::max(1, len(qa) // n)][:n]
        if not picked:
            return None
        answers, _ = self.ask(trained, [Question(e.prompt, (e.target,)) for e in picked], self.max_new_tokens)
        return round(_mean([contains(a, e.target) for a, e in zip(answers, picked)]), 4)

    def score_retention(self, trained):
        """Retention scores, with "answers" (one per retention question) added; None without retention."""
        if not self.retention:
            return None
        answers, _ = self.ask(trained, self.retention, self.options.retention_max_new_tokens)
        return {**score_answers("retention", self.retention, answers), "answers": answers}

    def forgotten(self, retention, limit=5):
        """Retention questions the base model answered and the method no longer does (a few)."""
        before = self.retention_before["answers"]
        lost = []
        for q, old, new in zip(self.retention, before, retention["answers"]):
            if max(contains(old, g) for g in q.answers) > max(contains(new, g) for g in q.answers):
                lost.append({"question": q.question, "gold": q.answers[0], "before": old, "after": new})
        return lost[:limit]

    # -- methods

    @functools.cached_property
    def background(self):
        """Text sampled once from the base model (cached on disk): calibration, slot counts and replay."""
        o = self.options
        return sample_background(self.base, self.tokenizer, o.background_sequences, o.background_len, o.seed,
                                 self.text_cache, o.background_questions)

    def fresh_memory(self):
        o = self.options
        return fresh_memory_model(self.base, self.tokenizer, o.memory, self.background, o.layers, o.seed,
                                  o.calibrate, self.counts_cache, o.learn.write_at)

    def train(self, method, budget_s):
        o = self.options
        if method == "memory":
            model, counts = self.fresh_memory()
            return train_memory_method(model, counts, self.tokenizer, self.examples, o.learn, budget_s, self.background)
        if method == "lora":
            return train_lora_method(self.base, self.tokenizer, self.examples, o.learn, budget_s, o.lora_lr,
                                     impl=o.lora_impl)
        if method == "lora_replay":
            return train_lora_method(self.base, self.tokenizer, self.examples, o.learn, budget_s, o.lora_lr,
                                     self.background, replay_per_batch=max(1, o.learn.batch_size // 2),
                                     impl=o.lora_impl)
        if method == "full":
            return train_full_method(self.base, self.tokenizer, self.examples, o.learn, budget_s, o.full_lr)
        if method == "rag":
            return Trained(self.base, retriever=BM25([c.text for c in self.chunks]))
        if method == "base":
            return Trained(self.base)
        raise ValueError(f"unknown method {method!r}; expected some of {METHODS}")

    def run_method(self, method, budget_s):
        start = time.perf_counter()
        trained = self.train(method, budget_s)
        asked = time.perf_counter()
        learned, prompt_tokens, samples, missed = self.score_learned(trained)
        before = self.retention_before
        retention = before if method == "base" else self.score_retention(trained)
        kept = f", retention {retention['acc']:.3f}" if retention else ""
        self.log(f"{method}: learned {learned['acc']:.3f}{kept} (training {trained.train_s:.1f} s, with setup "
                 f"{asked - start:.1f} s; asking {time.perf_counter() - asked:.1f} s)")
        result = {
            "learned_acc": learned["acc"],
            "retention_acc": retention["acc"] if retention else None,
            "prompt_tokens_per_question": round(prompt_tokens, 1),
            "train_s": round(trained.train_s, 2),
            "train_tokens_per_s": round(trained.tokens_per_s, 1),
            "memory_mb": round(trained.extra_bytes / 1e6, 2),
            "train_steps": trained.steps,
            "train_tokens": trained.tokens,
            "train_fit_acc": self.score_fit(trained),
            "retention_before": before["acc"] if before else None,
            "retention_drop": round(before["acc"] - retention["acc"], 4) if before and retention else None,
            "samples": samples,
            "missed_samples": missed,
            "forgotten_samples": self.forgotten(retention) if before and retention else [],
        }
        result.update({f"learned_{k}": v for k, v in learned.items() if k != "acc"})
        if retention:
            result["retention_f1"] = retention["f1"]
        return result

    def run(self):
        methods, budget = list(self.options.methods), self.options.budget_s
        if budget is None and "memory" not in methods and any(m in TRAINED for m in methods):
            raise ValueError("without the memory method there is no default budget: pass --budget-s")
        if self.retention:
            start = time.perf_counter()
            self.retention_before = self.score_retention(Trained(self.base))
            self.log(f"before learning: retention {self.retention_before['acc']:.3f} on {len(self.retention)} "
                     f"questions ({time.perf_counter() - start:.1f} s)")
        results = {}
        for method in sorted(methods, key=lambda m: m != "memory"):  # memory first: it sets the budget
            if method in ("lora", "lora_replay") and self.options.lora_impl == "peft" and not peft_available():
                self.log(f"skipping {method}: peft is not installed (pip install peft)")
                results[method] = {"skipped": "peft is not installed"}
                continue
            self.log(f"{method}: " + (f"training (budget {budget:.1f} s)" if method in TRAINED and budget
                                      else "training" if method in TRAINED else "asking"))
            results[method] = self.run_method(method, budget)
            if method == "memory" and budget is None:
                budget = results[method]["train_s"]
        return {m: results[m] for m in methods}, budget

    def run_sequential(self, k):
        """K learns in a row on one memory over K disjoint slices of the learned items; after each,
        the accuracy on the first slice and on the slice just learned."""
        items = len(self.data.documents)
        if not 1 <= k <= items:
            raise ValueError(f"--sequential {k}: needs between 1 and {items} (the number of learned items) batches")
        groups = [list(range(items * i // k, items * (i + 1) // k)) for i in range(k)]
        o = self.options
        model, counts = self.fresh_memory()
        trained = Trained(model)
        first_questions = [q for q in self.data.questions if q.item in groups[0]]
        steps = []
        for index, group in enumerate(groups, 1):
            examples = self.training_examples([self.data.documents[i] for i in group])
            stats = train_memory(model, self.tokenizer, examples, counts, o.learn, replay=self.background)
            if o.protect_learned:
                learned = target_slot_counts(model, self.tokenizer, examples, o.learn.max_len,
                                             write_at=o.learn.write_at)
                counts = with_learned(counts, learned, o.protect_learned)
            first = self.score_learned(trained, first_questions)[0]
            current = self.score_learned(trained, [q for q in self.data.questions if q.item in group])[0]
            steps.append({"learn": index, "items": len(group), "train_s": round(stats.seconds, 2),
                          "first_batch_acc": first["acc"] if first else None,
                          "batch_acc": current["acc"] if current else None})
            self.log(f"sequential learn {index}/{k}: first batch {steps[-1]['first_batch_acc']}, "
                     f"this batch {steps[-1]['batch_acc']}")
        recall = [s["first_batch_acc"] for s in steps]
        retention = self.score_retention(trained)
        return {"batches": k, "first_batch_recall": recall,
                "first_batch_retained": recall[-1] / recall[0] if recall and recall[0] else None,
                "retention_acc": retention["acc"] if retention else None, "steps": steps}


# ---------------------------------------------------------------- reporting

COLUMNS = (("learned_acc", "learned", "{:.3f}"), ("train_fit_acc", "train fit", "{:.3f}"),
           ("retention_before", "ret. before", "{:.3f}"),
           ("retention_acc", "ret. after", "{:.3f}"), ("prompt_tokens_per_question", "prompt tok/q", "{:.1f}"),
           ("train_s", "train s", "{:.1f}"), ("train_tokens_per_s", "train tok/s", "{:.1f}"),
           ("memory_mb", "extra MB", "{:.2f}"))


def markdown_table(methods, kind):
    extra = ("learned_rouge_l", "ROUGE-L", "{:.3f}") if kind == "qa" else ("learned_f1", "F1", "{:.3f}")
    columns = COLUMNS[:1] + (extra,) + COLUMNS[1:]
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, result in methods.items():
        if "skipped" in result:
            lines.append(f"| {name} | skipped: {result['skipped']} |" + " |" * (len(columns) - 1))
            continue
        cells = ["" if result.get(key) is None else form.format(result[key]) for key, _, form in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sequential_table(sequential):
    lines = ["| learn | items | first-batch acc | this-batch acc | train s |", "|---:|---:|---:|---:|---:|"]
    for s in sequential["steps"]:
        lines.append(f"| {s['learn']} | {s['items']} | {s['first_batch_acc']:.3f} | {s['batch_acc']:.3f} | "
                     f"{s['train_s']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def add_eval_arguments(parser):
    """The options of `engram eval` (build_parser adds them to its subcommand)."""
    parser.add_argument("--data", required=True,
                        help="passages [{title, context, questions}] or facts [{question, answer}]")
    parser.add_argument("--retention", nargs="*", default=[], metavar="FILE",
                        help="[{question, answer}] files asked before and after, never trained on")
    parser.add_argument("--methods", help=f"comma-separated among {','.join(METHODS)} (default: all; "
                        "none with --sequential)")
    parser.add_argument("--limit", type=int, help="learn only the first N passages or facts")
    parser.add_argument("--retention-limit", type=int, help="ask only the first N questions of each retention file")
    parser.add_argument("--model", help="Hugging Face id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--budget-s", type=float,
                        help="training seconds per method (default: the memory method's time)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--plot", metavar="PNG", help="also plot learned vs retained (and a sequential run) here")
    parser.add_argument("--sequential", type=int, default=0, metavar="K",
                        help="also K learns in a row on one memory; report first-batch recall after each")
    defaults, options = LearnConfig(), EvalOptions()
    parser.add_argument("--layers", help="comma-separated decoder layers for memory (default: middle)")
    for name, value in options.memory.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, help="memory layer size")
    parser.add_argument("--top-t", type=int, default=defaults.top_t)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="memory learning rate")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="memory epochs (without --budget-s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-len", type=int, default=defaults.max_len)
    parser.add_argument("--distill", type=float, default=defaults.distill_weight)
    add_slot_arguments(parser)
    parser.add_argument("--memory-replay", type=int, default=defaults.replay_per_batch,
                        help="background examples mixed into every memory batch (0: none)")
    parser.add_argument("--lora-lr", type=float, default=options.lora_lr)
    parser.add_argument("--lora-impl", choices=LORA_IMPLS, default=options.lora_impl,
                        help="LoRA layers: peft's, or engram's fused LoRALinear")
    parser.add_argument("--full-lr", type=float, default=options.full_lr)
    parser.add_argument("--chunk-tokens", type=int, default=options.chunk_tokens,
                        help="passage size for RAG; training examples use chunks of at most max-len - 8 tokens")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (default: 64 for facts, 32 for passages)")
    parser.add_argument("--background-sequences", type=int, default=options.background_sequences,
                        help="sequences of background text sampled from the model (slot statistics, replay)")
    parser.add_argument("--background-len", type=int, default=options.background_len, help="their length in tokens")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="keep the memory's random query projection "
                             "(default: centered and whitened on the background text)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def options_from_args(args):
    """EvalOptions from parsed `engram eval` arguments (slot options left out are set on `args` to
    their defaults for --addressing, so the recorded command shows them)."""
    resolve_slot_arguments(args, args.addressing)
    if args.methods is None:
        methods = () if args.sequential else METHODS
    else:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {','.join(METHODS)}")
    if not methods and not args.sequential:
        raise ValueError("nothing to run: give --methods or --sequential K")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {args.budget_s}")
    learn = LearnConfig(top_t=args.top_t, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                        max_len=args.max_len, distill_weight=args.distill,
                        replay_per_batch=args.memory_replay, write_at=args.write_at,
                        max_background_share=args.max_background_share, seed=args.seed)
    memory = memory_config(args.addressing, **{name: getattr(args, name) for name in EvalOptions().memory})
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    return EvalOptions(methods=methods, budget_s=args.budget_s, learn=learn, memory=memory, layers=layers,
                       chunk_tokens=args.chunk_tokens, max_new_tokens=args.max_new_tokens, lora_lr=args.lora_lr,
                       lora_impl=getattr(args, "lora_impl", "peft"),
                       full_lr=args.full_lr, sequential=args.sequential, protect_learned=args.protect_learned,
                       background_sequences=args.background_sequences,
                       background_len=args.background_len, background_questions=args.background_questions,
                       calibrate=not args.no_calibrate, seed=args.seed)


def command_line(args):
    """The full `engram eval` command, every option spelled out, so the JSON says exactly what ran."""
    words = ["engram", "eval"]
    for key, value in sorted(vars(args).items()):
        if key in ("command", "func", "home") or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:  # a store_true flag
            words.append(flag)
        else:
            words += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return shlex.join(words)


def run_from_args(args, log=print):
    from .models import load_model
    try:
        options = options_from_args(args)
        data = load_eval_data(args.data, args.limit)
        retention = [q for path in args.retention for q in load_retention(path, args.retention_limit)]
    except (EvalDataError, ValueError) as error:
        raise SystemExit(f"engram eval: {error}")
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    harness = Harness(model, tokenizer, data, retention, options, log)
    log(f"{len(data.documents)} {'passages' if data.kind == 'squad' else 'facts'} ({len(harness.chunks)} RAG passages, "
        f"{len(harness.examples)} training examples), {len(data.questions)} questions, "
        f"{len(retention)} retention questions")
    try:
        methods, budget = harness.run()
        sequential = harness.run_sequential(options.sequential) if options.sequential else None
    except ValueError as error:
        raise SystemExit(f"engram eval: {error}")
    report = {"methods": methods, "command": command_line(args), "model": args.model or "SmolLM2-135M-Instruct",
              "data": args.data, "retention": list(args.retention), "kind": data.kind,
              "learned_items": len(data.documents), "questions": len(data.questions),
              "retention_questions": len(retention), "training_examples": len(harness.examples),
              "budget_s": budget, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "threads": torch.get_num_threads(), "wall_s": None}
    if sequential:
        report["sequential"] = sequential
    report["wall_s"] = round(time.perf_counter() - start, 1)
    if methods:
        log(markdown_table(methods, data.kind))
    if sequential:
        log(sequential_table(sequential))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")
    if args.plot:
        from .plot import plot_reports
        log(f"wrote {plot_reports([(Path(args.json or args.plot).stem, report)], args.plot)}")
    return 0
