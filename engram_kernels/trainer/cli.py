"""`engram`: learn documents into memory layers, ask closed-book, manage memory versions.

    engram learn PATH... [--model ID_OR_PATH]   ingest, dream, train the memory, save a new version
    engram ask "QUESTION"                        answer with the memory, no documents in the prompt
    engram memory list | rollback VERSION        versions written by each learn

State lives in --home (default $ENGRAM_HOME or ./.engram): journal.sqlite (what was ingested),
memory/ (base memory + versions, each with the slots its examples read: --protect-learned),
background.json (text the model wrote itself: memory addressing, slot usage, replay) and
background.safetensors (its slot counts).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ..integrations import memory_layers
from .background import add_calibrated_memory, background_counts, sample_background
from .dreaming import drop_known, external_examples, fallback_examples, format_prompt, self_study_examples
from .evaluate import generate_answers
from .ingest import IngestError, chunk_documents, read_sources
from .journal import Journal
from .learn import (MEMORY_LAYER, LearnConfig, add_slot_arguments, memory_config, resolve_slot_arguments,
                    target_slot_counts, train_memory)
from .models import load_model
from .slots import with_learned
from .versions import MemoryStore

DEFAULT_HOME = ".engram"


def _home(args):
    home = Path(args.home or os.environ.get("ENGRAM_HOME") or DEFAULT_HOME)
    if home.exists() and not home.is_dir():
        raise SystemExit(f"engram: the state directory {home} is a file; use another --home")
    home.mkdir(parents=True, exist_ok=True)
    return home


def _at_least(minimum):
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def _memory_config(args):
    return memory_config(args.addressing, heads=args.heads, k=args.k, n_keys=args.n_keys, key_dim=args.key_dim)


def open_model(home, args, create=False):
    """The model with its memory at the current version; on first use, a fresh memory is added."""
    store = MemoryStore(home)
    if store.has_base():
        name = store.base_model_name() or None
        if getattr(args, "model", None) and args.model != name:
            raise SystemExit(f"engram: {home} holds a memory for model {name or 'the default'}, not {args.model}; "
                             f"use another --home")
        model, tokenizer = load_model(name)
        store.load_into(model)
        if create:  # a learn: the slot options follow the stored memory's addressing
            resolve_slot_arguments(args, next(iter(memory_layers(model).values())).addressing)
    elif create:
        resolve_slot_arguments(args, args.addressing)
        model, tokenizer = load_model(args.model)
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        background = _background(home, model, tokenizer, args)
        torch.manual_seed(args.seed)  # the memory's keys and query projection are part of its identity
        add_calibrated_memory(model, tokenizer, background, layers, not args.no_calibrate, **_memory_config(args))
        store.save_base(model, args.model or "")
    else:
        raise SystemExit(f"engram: no memory in {home}; run `engram learn PATH...` first")
    model.requires_grad_(False).eval()
    return model, tokenizer, store


def _background(home, model, tokenizer, args):
    questions = args.background_questions
    name = f"background-q{questions}.json" if questions else "background.json"
    return sample_background(model, tokenizer, seed=args.seed, cache_path=home / name, n_questions=questions)


def sync_journal(journal, store):
    """Make "learned" mean "in the current memory": the documents of the versions on the chain to
    CURRENT. Repairs a crash between saving a version and updating the journal, and a rollback."""
    journal.unlearn_after(0)
    for version in store.chain(store.current()):
        documents = [d for d in store.manifest(version)["documents"] if journal.get(d) is not None]
        journal.mark_learned(documents, version)


def _examples(docs, model, tokenizer, args):
    examples = []
    for doc in docs:
        examples += fallback_examples(doc)
        if args.dream == "self":
            examples += self_study_examples(doc, model, tokenizer)
        elif args.dream == "external":
            examples += external_examples(doc, args.endpoint, args.endpoint_model, os.environ.get("OPENAI_API_KEY"))
    return examples


def _progress(step, total, loss, tokens_per_s):
    end = "\n" if step == total else ""
    print(f"\r  step {step}/{total}  loss {loss:.3f}  {tokens_per_s:.0f} tok/s", end=end, flush=True)


def cmd_learn(args):
    start = time.perf_counter()
    home = _home(args)
    try:
        sources = read_sources(args.paths)
    except IngestError as exc:
        raise SystemExit(f"engram: {exc}")
    model, tokenizer, store = open_model(home, args, create=True)
    with Journal(home / "journal.sqlite") as journal:
        sync_journal(journal, store)
        added = journal.add_many(chunk_documents(sources, tokenizer, args.chunk_tokens,
                                                 overlap=min(32, args.chunk_tokens // 2)))  # 32 from 64 tokens up
        pending = journal.pending()
        print(f"ingested {len(sources)} source documents: {added} new chunks, {len(pending)} to learn")
        if not pending:
            print("nothing new to learn")
            return 0
        background = _background(home, model, tokenizer, args)
        counts = background_counts(model, tokenizer, background, cache_path=home / "background.safetensors",
                                   write_at=args.write_at)
        learned = store.learned_reads(model) if args.protect_learned else None
        if learned:
            counts = with_learned(counts, learned, args.protect_learned)
            print(f"earlier learns read {sum(int((c > 0).sum()) for c in learned[0].values())} slots: "
                  f"counted {args.protect_learned:g}x as background")
        examples = _examples(pending, model, tokenizer, args)
        kept, skipped = drop_known(examples, model, tokenizer, args.skip_known)
        print(f"dreamed {len(examples)} examples; {skipped} skipped as already known")
        before = {layer: m.values.detach().clone() for layer, m in memory_layers(model).items()}
        config = LearnConfig(top_t=args.top_t, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                             max_len=args.max_len, distill_weight=args.distill, replay_per_batch=args.replay,
                             write_at=args.write_at, max_background_share=args.max_background_share,
                             seed=args.seed)
        stats = train_memory(model, tokenizer, kept, counts, config, progress=_progress,
                             replay=background) if kept else None
        summary = {**(stats.as_dict() if stats else {}), "skipped_known": skipped}
        reads = target_slot_counts(model, tokenizer, kept, args.max_len, write_at=args.write_at) if kept else None
        version = store.save_version(model, before, [d.id for d in pending], summary, reads)
        journal.mark_learned([d.id for d in pending], version)
    changed = sum(store.manifest(version)["rows_changed"].values())
    rate = f"{stats.tokens_per_s:.0f} training tokens/s, " if stats else ""
    print(f"memory version {version}: {changed} slots changed, {rate}{skipped} examples skipped as known, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def answer(model, tokenizer, question, max_new_tokens=64):
    """Greedy closed-book answer: the question alone in the prompt."""
    answers, _ = generate_answers(model, tokenizer, [format_prompt(tokenizer, question)], max_new_tokens)
    return answers[0]


def cmd_ask(args):
    model, tokenizer, _ = open_model(_home(args), args)
    print(answer(model, tokenizer, args.question, args.max_new_tokens))
    return 0


def cmd_memory(args):
    store = MemoryStore(_home(args))
    if not store.has_base():
        raise SystemExit("engram: no memory yet; run `engram learn PATH...` first")
    if args.action == "rollback":
        try:
            store.set_current(args.version)
        except ValueError as error:
            raise SystemExit(f"engram: {error}") from None
        with Journal(_home(args) / "journal.sqlite") as journal:
            sync_journal(journal, store)
            pending = journal.counts()["pending"]
        print(f"memory now at version {args.version}; {pending} documents will be learned again by the next learn")
        return 0
    current = store.current()
    print(f"{'':2}{'version':>7}  {'parent':>6}  {'created':19}  {'documents':>9}  {'slots changed':>13}")
    print(f"{'*' if current == 0 else '':2}{0:>7}  {'':>6}  {'(base)':19}")
    for m in store.versions():
        print(f"{'*' if m['version'] == current else '':2}{m['version']:>7}  {m['parent']:>6}  {m['created']:19}  "
              f"{len(m['documents']):>9}  {sum(m['rows_changed'].values()):>13}")
    return 0


def cmd_eval(args):
    from .evaluate import run_from_args
    return run_from_args(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="engram", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="state directory (default: $ENGRAM_HOME or ./.engram)")
    sub = parser.add_subparsers(dest="command", required=True)

    learn = sub.add_parser("learn", parents=[common], help="learn documents into memory")
    learn.add_argument("paths", nargs="+", help="text/markdown files, folders, JSONL of documents or Q/A or chats")
    learn.add_argument("--model", help="Hugging Face id or local path (default: SmolLM2-135M-Instruct)")
    learn.add_argument("--dream", choices=["fallback", "self", "external"], default="fallback",
                       help="example generation: templates only, the model itself, or --endpoint")
    learn.add_argument("--endpoint", help="OpenAI-compatible base URL for --dream external")
    learn.add_argument("--endpoint-model", default="gpt-4o-mini")
    learn.add_argument("--layers", help="comma-separated decoder layers for new memory (default: middle)")
    learn.add_argument("--n-keys", type=int, default=MEMORY_LAYER["n_keys"], help="sub-keys per half: n_keys**2 slots")
    learn.add_argument("--heads", type=int, default=MEMORY_LAYER["heads"])
    learn.add_argument("--k", type=int, default=MEMORY_LAYER["k"], help="slots read per head and token")
    learn.add_argument("--key-dim", type=int, default=MEMORY_LAYER["key_dim"])
    learn.add_argument("--no-calibrate", action="store_true",
                       help="new memory: keep the random query projection (default: whitened on background text)")
    defaults = LearnConfig()
    learn.add_argument("--top-t", type=int, default=defaults.top_t, help="slots allowed to change per batch")
    learn.add_argument("--lr", type=float, default=defaults.lr)
    learn.add_argument("--epochs", type=int, default=defaults.epochs)
    learn.add_argument("--batch-size", type=int, default=defaults.batch_size)
    learn.add_argument("--max-len", type=int, default=defaults.max_len)
    learn.add_argument("--replay", type=int, default=defaults.replay_per_batch,
                       help="background examples (the model's own text) mixed into every batch")
    add_slot_arguments(learn)
    learn.add_argument("--distill", type=float, default=defaults.distill_weight, help="context-distillation weight")
    learn.add_argument("--skip-known", type=float, default=0.3, help="skip examples with target loss below this")
    learn.add_argument("--chunk-tokens", type=_at_least(1), default=112,
                       help="document chunk size; keep below --max-len")
    learn.add_argument("--seed", type=int, default=0)
    learn.set_defaults(func=cmd_learn)

    ask = sub.add_parser("ask", parents=[common], help="answer a question from memory (closed book)")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.set_defaults(func=cmd_ask)

    memory = sub.add_parser("memory", parents=[common], help="list memory versions or roll back to one")
    memory.add_argument("action", choices=["list", "rollback"])
    memory.add_argument("version", type=_at_least(0), nargs="?")
    memory.set_defaults(func=cmd_memory)

    from .evaluate import add_eval_arguments
    evaluation = sub.add_parser("eval", help="compare memory with LoRA, full fine-tuning, RAG and the base model")
    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=cmd_eval)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "memory" and args.action == "rollback" and args.version is None:
        raise SystemExit("engram: memory rollback needs a VERSION (see `engram memory list`)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
