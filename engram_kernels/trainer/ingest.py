"""Read what a user wants learned into Documents: text and markdown files, folders, JSONL/JSON records.

Records are documents `{"text": ..., "title"?: ..., "id"?: ...}` (SQuAD-style `"context"` works as
"text"), question/answer pairs `{"question": ..., "answer": ...}`, or chats
`{"messages": [{"role": ..., "content": ...}, ...]}`: what a user stated becomes a "text" document, a
user question with the assistant's answer a "qa" document. A document's id is the sha256 of its
content, so the same content read from another file is the same document.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MAX_LINE_CHARS = 100_000
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl", ".json")
KINDS = ("text", "qa")
CHAT_ROLES = {"user", "assistant", "system", "developer", "tool"}
# First words that make a user message a question or request (besides a final "?").
QUESTION_STARTS = {"who", "whom", "whose", "what", "which", "when", "where", "why", "how", "is", "are", "was",
                   "were", "do", "does", "did", "can", "could", "would", "should", "tell", "explain",
                   "describe", "list", "define", "summarize", "summarise"}


class IngestError(ValueError):
    """Input that cannot be learned; the message names the file (and line)."""


@dataclass
class Document:
    id: str
    source: str
    kind: str
    text: str
    question: str | None = None
    answer: str | None = None

    @classmethod
    def make(cls, source, kind, text=None, question=None, answer=None):
        """A Document with its content id; a "qa" document's text is its question and answer."""
        if kind not in KINDS:
            raise ValueError(f"document kind must be one of {KINDS}, not {kind!r}")
        if kind == "qa":
            question, answer = _clean(question), _clean(answer)
            if not question or not answer:
                raise ValueError(f"{source}: a qa document needs a non-empty question and answer")
            text = f"{question}\n{answer}"
        text = _clean(text)
        if not text:
            raise ValueError(f"{source}: document text is empty")
        return cls(document_id(kind, text, question, answer), str(source), kind, text, question, answer)


def document_id(kind, text, question=None, answer=None) -> str:
    """sha256 hex of the content; JSON keeps the fields apart ("ab"+"c" differs from "a"+"bc")."""
    payload = json.dumps([kind, text, question, answer], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _clean(text):
    return None if text is None else str(text).replace("\r\n", "\n").replace("\r", "\n").strip()


# ----- reading files ---------------------------------------------------------------------------

def read_sources(paths) -> list[Document]:
    """Documents from files and folders, in the order given (folders: sorted); repeated content once."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    documents = {}
    for path in paths:
        for file in source_files(path):
            for document in read_file(file):
                documents.setdefault(document.id, document)
    return list(documents.values())


def source_files(path) -> list[Path]:
    """The file itself, or a folder's .txt/.md/.jsonl/.json files (recursive, sorted, hidden ones skipped)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise IngestError(f"{path}: not a regular file or folder")
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [Path(folder, name) for name in names
                  if not name.startswith(".") and name.lower().endswith(FOLDER_SUFFIXES)]
    if not files:
        raise IngestError(f"{path}: folder holds no {', '.join(FOLDER_SUFFIXES)} files")
    return sorted(files, key=lambda file: file.relative_to(path).parts)


def read_file(path) -> list[Document]:
    """One text document for a text file; the records of a .jsonl or .json file."""
    path = Path(path)
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        documents = _jsonl_documents(path, text)
    elif suffix == ".json":
        documents = _json_documents(path, text)
    else:
        return [Document.make(str(path), "text", text)]
    if not documents:
        raise IngestError(f"{path}: nothing to learn (only questions without answers)")
    return documents


def read_text(path) -> str:
    """A file's UTF-8 text; IngestError for unreadable, binary, non-UTF-8, empty or absurdly long-lined files."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise IngestError(f"{path}: cannot read: {error.strerror or error}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise IngestError(f"{path}:1: UTF-16 text; convert the file to UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise IngestError(f"{path}:{_line_of(data, nul)}: binary file (NUL byte at offset {nul}); "
                          "only UTF-8 text is accepted")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise IngestError(f"{path}:{_line_of(data, error.start)}: not UTF-8 (byte 0x{data[error.start]:02x} at "
                          f"offset {error.start}); convert the file to UTF-8") from None
    if not text.strip():
        raise IngestError(f"{path}: file is empty" + (" (whitespace only)" if text else ""))
    for number, line in enumerate(text.splitlines(), 1):
        if len(line) > MAX_LINE_CHARS:
            raise IngestError(f"{path}:{number}: line of {len(line)} characters, over the limit of "
                              f"{MAX_LINE_CHARS}: not prose; split it into lines (JSONL: one record per line)")
    return text


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _jsonl_documents(path, text):
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise IngestError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
        documents += record_documents(record, where=f"{path}:{number}", path=path)
    return documents


def _json_documents(path, text):
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise IngestError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
    records = content if isinstance(content, list) else [content]
    if not records:
        raise IngestError(f"{path}:1: empty JSON list")
    documents = []
    for index, record in enumerate(records):
        where = f"{path}: item {index}" if isinstance(content, list) else f"{path}:1"
        documents += record_documents(record, where=where, path=path)
    return documents


# ----- records ---------------------------------------------------------------------------------

def record_documents(record, *, where, path) -> list[Document]:
    """The documents of one JSON record; `where` (file:line) names it in errors and as the source."""
    if not isinstance(record, dict):
        raise IngestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    source = f"{path}#{record['id']}" if isinstance(record.get("id"), (str, int)) else where
    if "messages" in record:
        return _chat_documents(record["messages"], where, source)
    if "question" in record and "answer" in record:
        question = _field(record, "question", where)
        answer = _field(record, "answer", where, numbers=True)
        return [Document.make(source, "qa", question=question, answer=answer)]
    for key in ("text", "context"):
        if key in record:
            text = _field(record, key, where)
            title = _field(record, "title", where) if record.get("title") is not None else ""
            return [Document.make(source, "text", f"{title}\n\n{text}" if title else text)]
    raise IngestError(f"{where}: unknown record with keys {sorted(record)}; expected \"text\" (document), "
                      "\"question\" and \"answer\" (pair) or \"messages\" (chat)")


def _field(record, key, where, numbers=False):
    value = record[key]
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise IngestError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    if not value.strip():
        raise IngestError(f"{where}: \"{key}\" is empty")
    return value


def _chat_documents(messages, where, source):
    """User statements -> one "text" document; each user question + assistant answer -> a "qa" document."""
    turns = [_chat_turn(message, where, index) for index, message in enumerate(_message_list(messages, where))]
    turns = [(role, content) for role, content in turns if role in ("user", "assistant") and content]
    statements, documents = [], []
    for index, (role, content) in enumerate(turns):
        if role != "user":
            continue
        reply = turns[index + 1][1] if index + 1 < len(turns) and turns[index + 1][0] == "assistant" else None
        if not is_question(content):
            statements.append(content)
        elif reply:  # a question nobody answered holds no fact
            documents.append(Document.make(source, "qa", question=content, answer=reply))
    if statements:
        documents.insert(0, Document.make(source, "text", "\n".join(statements)))
    return documents


def _message_list(messages, where):
    if not isinstance(messages, list) or not messages:
        raise IngestError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    return messages


def _chat_turn(message, where, index):
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise IngestError(f"{where}: message {index} must be an object with \"role\" and \"content\"")
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise IngestError(f"{where}: message {index} has unknown role {role!r}; expected one of {sorted(CHAT_ROLES)}")
    if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
        content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict)
                            and part.get("type") == "text")
    if content is not None and not isinstance(content, str):
        raise IngestError(f"{where}: message {index} content must be a string, got {type(content).__name__}")
    return role, _clean(content)


def is_question(text: str) -> bool:
    """A question or a request for information: ends with "?" or starts with a question word."""
    words = text.split(maxsplit=1)
    return text.rstrip().endswith("?") or bool(words) and words[0].lower().strip(",:") in QUESTION_STARTS


# ----- chunking --------------------------------------------------------------------------------

def chunk_tokens(text, tokenizer, max_tokens=256, overlap=32) -> list[str]:
    """Pieces of `text` of at most `max_tokens` tokens, consecutive ones sharing about `overlap` tokens.

    Cuts fall on token boundaries: at a sentence end in the second half of a window when there is one,
    else between words when possible; a piece starts at a word start when one lies in the overlap.
    """
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(f"need max_tokens >= 1 and 0 <= overlap < max_tokens, got {max_tokens}, {overlap}")
    if not text.strip():
        return []
    if not getattr(tokenizer, "is_fast", False):
        return _chunk_by_decoding(text, tokenizer, max_tokens, overlap)
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    chunks, start = [], 0
    while start < len(spans):
        end = min(start + max_tokens, len(spans))
        if end < len(spans):
            end = _natural_cut(text, spans, start, end, lowest=start + max(overlap + 1, (end - start) // 2))
        chunk, end = _fitting_chunk(text, spans, start, end, tokenizer, max_tokens)
        if chunk:
            chunks.append(chunk)
        if end >= len(spans):
            break
        start = _word_start(text, spans, max(end - overlap, start + 1), end)
    return chunks


def _natural_cut(text, spans, start, end, lowest):
    """Token index to cut before: after the last sentence end in spans[lowest-1:end], else before the
    last word start there, else `end`."""
    lowest = max(lowest, start + 1)
    for index in range(end, lowest - 1, -1):
        stop = spans[index - 1][1]
        if text[stop - 1] in ".!?\n" and (stop == len(text) or text[stop].isspace()):
            return index
    for index in range(end, lowest - 1, -1):
        if _starts_word(text, spans[index][0]):
            return index
    return end


def _word_start(text, spans, first, end):
    for index in range(first, end):
        if _starts_word(text, spans[index][0]):
            return index
    return first


def _starts_word(text, begin):
    return begin == 0 or text[begin - 1].isspace() or text[begin].isspace()


def _fitting_chunk(text, spans, start, end, tokenizer, max_tokens):
    """The stripped text of spans[start:end], shortened until it re-encodes to <= max_tokens tokens."""
    while True:
        chunk = text[spans[start][0]:spans[end - 1][1]].strip()
        excess = len(tokenizer.encode(chunk, add_special_tokens=False)) - max_tokens
        if excess <= 0 or end - start <= 1:
            return chunk, end
        end = max(start + 1, end - excess)


def _chunk_by_decoding(text, tokenizer, max_tokens, overlap):
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = max_tokens - overlap
    windows = (ids[start:start + max_tokens] for start in range(0, max(len(ids) - overlap, 1), step))
    return [chunk for chunk in (tokenizer.decode(window, skip_special_tokens=True).strip() for window in windows)
            if chunk]


def chunk_document(document, tokenizer, max_tokens=256, overlap=32) -> list[Document]:
    """A text document cut into chunk documents (itself when it fits); qa documents stay whole."""
    if document.kind != "text":
        return [document]
    chunks = chunk_tokens(document.text, tokenizer, max_tokens, overlap)
    if len(chunks) <= 1:
        return [document]
    return [Document.make(f"{document.source}#chunk{index}", "text", chunk) for index, chunk in enumerate(chunks)]


def chunk_documents(documents, tokenizer, max_tokens=256, overlap=32) -> list[Document]:
    """`chunk_document` over many documents, in order; a chunk repeated elsewhere appears once."""
    chunks = {}
    for document in documents:
        for chunk in chunk_document(document, tokenizer, max_tokens, overlap):
            chunks.setdefault(chunk.id, chunk)
    return list(chunks.values())
