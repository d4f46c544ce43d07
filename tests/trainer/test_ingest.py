"""Ingestion: files, folders, JSONL/JSON records, chats, clear errors for bad input, token chunking."""
import json

import pytest

from engram_kernels.trainer.ingest import (MAX_LINE_CHARS, Document, IngestError, chunk_document, chunk_documents,
                                           chunk_tokens, document_id, is_question, read_sources)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path, records):
    return write(path, "\n".join(json.dumps(record) for record in records) + "\n")


def test_text_and_markdown_files_become_text_documents(tmp_path):
    notes = write(tmp_path / "notes.txt", "The capital of Veloria is Quartzholm.\r\n")
    readme = write(tmp_path / "README.md", "# Ost\n\nThe river Ost flows north.")
    documents = read_sources([notes, readme])
    assert [d.kind for d in documents] == ["text", "text"]
    assert documents[0].text == "The capital of Veloria is Quartzholm."  # line ends normalized, stripped
    assert documents[0].source == str(notes)
    assert documents[1].text.startswith("# Ost")


def test_id_is_the_content_hash_wherever_the_content_comes_from(tmp_path):
    first = write(tmp_path / "a.txt", "Mira Dask wrote Glass Harbors.")
    second = write(tmp_path / "sub" / "b.md", "Mira Dask wrote Glass Harbors.\n")
    [a] = read_sources(first)
    [b] = read_sources(second)
    assert a.id == b.id == document_id("text", "Mira Dask wrote Glass Harbors.")
    assert len(a.id) == 64 and a.source != b.source
    assert read_sources([first, second]) == [a]  # repeated content once
    assert document_id("text", "ab", "c") != document_id("text", "a", "bc")


def test_folder_is_read_recursively_sorted_without_hidden_or_other_files(tmp_path):
    write(tmp_path / "b.txt", "B text.")
    write(tmp_path / "a" / "z.md", "AZ text.")
    write(tmp_path / "a" / "c.jsonl", json.dumps({"text": "AC text."}))
    write(tmp_path / ".hidden.txt", "hidden file")
    write(tmp_path / ".git" / "x.txt", "hidden folder")
    write(tmp_path / "image.png", "not read")
    write(tmp_path / "data.json", json.dumps([{"question": "Q?", "answer": "A."}]))
    texts = [d.text for d in read_sources(tmp_path)]
    assert texts == ["AC text.", "AZ text.", "B text.", "Q?\nA."]


def test_jsonl_documents_pairs_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [
        {"text": "Engram layers store facts.", "title": "Engram", "id": "doc-7"},
        {"question": "Who wrote Glass Harbors?", "answer": "Mira Dask"},
        {"question": "In which year?", "answer": 1987},
        {"title": "Ost", "context": "The river Ost flows north.", "questions": []},  # SQuAD shape
    ])
    doc, pair, number, squad = read_sources(path)
    assert (doc.kind, doc.text, doc.source) == ("text", "Engram\n\nEngram layers store facts.", f"{path}#doc-7")
    assert (pair.kind, pair.question, pair.answer) == ("qa", "Who wrote Glass Harbors?", "Mira Dask")
    assert pair.text == "Who wrote Glass Harbors?\nMira Dask" and pair.source == f"{path}:2"
    assert number.answer == "1987"
    assert squad.text == "Ost\n\nThe river Ost flows north."


def test_chat_statements_become_text_and_answered_questions_qa(tmp_path):
    chat = {"messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "My dog is called Pixel."},
        {"role": "assistant", "content": "Noted!"},
        {"role": "user", "content": "What is the capital of Veloria?"},
        {"role": "assistant", "content": "Quartzholm."},
        {"role": "user", "content": [{"type": "text", "text": "I moved to Ostby in 2021."}]},
        {"role": "user", "content": "Where is Ostby?"},  # never answered: no fact
    ]}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat, {"messages": [{"role": "user", "content": "Hi there."}]}])
    statements, pair, greeting = read_sources(path)
    assert statements.kind == "text"
    assert statements.text == "My dog is called Pixel.\nI moved to Ostby in 2021."
    assert (pair.kind, pair.question, pair.answer) == ("qa", "What is the capital of Veloria?", "Quartzholm.")
    assert greeting.text == "Hi there." and greeting.source == f"{path}:2"


def test_question_detection():
    assert is_question("Who wrote it") and is_question("tell me about Ost.") and is_question("Really?")
    assert not is_question("My dog is called Pixel.") and not is_question("May 5 is my birthday.")


def test_document_make_checks_its_input():
    with pytest.raises(ValueError, match="kind"):
        Document.make("s", "poem", "x")
    with pytest.raises(ValueError, match="question and answer"):
        Document.make("s", "qa", question="Q?", answer=" ")
    with pytest.raises(ValueError, match="empty"):
        Document.make("s", "text", "  \n")


# ----- clear errors ----------------------------------------------------------------------------

def error_for(paths):
    with pytest.raises(IngestError) as caught:
        read_sources(paths)
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


def test_missing_path(tmp_path):
    assert "no such file" in error_for(tmp_path / "nope.txt") and "nope.txt" in error_for(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path / "empty.txt", content)
    message = error_for(path)
    assert str(path) in message and "empty" in message


def test_binary_file_names_file_and_line(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"first line\nsecond\x00\x01\x02")
    assert error_for(path).startswith(f"{path}:2: binary file")


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\nok\ncaf\u00e9".encode("latin-1"))
    message = error_for(path)
    assert message.startswith(f"{path}:3: not UTF-8") and "0xe9" in message


def test_utf16_file(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes("hello".encode("utf-16"))
    assert "UTF-16" in error_for(path)


def test_absurdly_long_line(tmp_path):
    path = write(tmp_path / "long.md", "fine\n" + "x" * (MAX_LINE_CHARS + 1) + "\n")
    message = error_for(path)
    assert message.startswith(f"{path}:2: line of {MAX_LINE_CHARS + 1} characters")
    write(tmp_path / "ok.md", "y" * MAX_LINE_CHARS)
    assert read_sources(tmp_path / "ok.md")


def test_malformed_json_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": "broken\n')
    assert error_for(path).startswith(f"{path}:3: malformed JSON")


@pytest.mark.parametrize("record, expected", [
    ({"body": "x"}, "unknown record with keys ['body']"),
    (["text", "x"], "expected a JSON object"),
    ({"text": 5}, '"text" must be a string'),
    ({"question": "Q?", "answer": ""}, '"answer" is empty'),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "unknown role"),
    ({"messages": [{"content": "x"}]}, "must be an object with"),
])
def test_jsonl_record_of_unknown_shape(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "records.jsonl", [{"text": "fine"}, record])
    message = error_for(path)
    assert message.startswith(f"{path}:2: ") and expected in message


def test_json_errors_name_the_item(tmp_path):
    path = write(tmp_path / "items.json", json.dumps([{"text": "fine"}, {"nope": 1}]))
    assert error_for(path).startswith(f"{path}: item 1: unknown record")
    assert error_for(write(tmp_path / "broken.json", '[\n{"text": }]')).endswith("(Expecting value at column 10)")


def test_records_with_nothing_to_learn(tmp_path):
    path = write_jsonl(tmp_path / "questions.jsonl", [{"messages": [{"role": "user", "content": "Why?"}]}])
    assert "nothing to learn" in error_for(path)


def test_folder_without_readable_files(tmp_path):
    write(tmp_path / "photo.jpg", "x")
    assert "folder holds no" in error_for(tmp_path)


# ----- chunking --------------------------------------------------------------------------------

SENTENCES = [f"Fact number {i} says the river Ost flows north into the Pale Sea." for i in range(12)]
LONG_TEXT = " ".join(SENTENCES)


def token_count(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chunks_respect_the_token_limit_and_cover_the_text(tokenizer):
    chunks = chunk_tokens(LONG_TEXT, tokenizer, max_tokens=48, overlap=8)
    assert len(chunks) > 3
    assert all(token_count(tokenizer, chunk) <= 48 for chunk in chunks)
    assert all(chunk in LONG_TEXT for chunk in chunks)  # cut from the text, not re-decoded
    assert chunks[0].startswith("Fact number 0") and chunks[-1].endswith("Pale Sea.")
    for before, after in zip(chunks, chunks[1:]):  # consecutive chunks overlap
        assert after[:10] in before


def test_chunks_prefer_sentence_ends(tokenizer):
    window = 2 * token_count(tokenizer, SENTENCES[0] + " ")
    chunks = chunk_tokens(LONG_TEXT, tokenizer, max_tokens=window, overlap=4)
    assert all(chunk.endswith(".") for chunk in chunks)


def test_short_and_empty_text(tokenizer):
    assert chunk_tokens("Hello Ost.", tokenizer) == ["Hello Ost."]
    assert chunk_tokens(" \n", tokenizer) == []
    with pytest.raises(ValueError, match="overlap"):
        chunk_tokens("x", tokenizer, max_tokens=8, overlap=8)


def test_chunks_without_overlap_partition_the_tokens(tokenizer):
    text = "abcdefghij" * 30  # no spaces or sentence ends: cuts fall mid-word
    chunks = chunk_tokens(text, tokenizer, max_tokens=16, overlap=0)
    assert "".join(chunks) == text and all(token_count(tokenizer, chunk) <= 16 for chunk in chunks)


def test_chunk_document(tokenizer):
    document = Document.make("notes.txt", "text", LONG_TEXT)
    pieces = chunk_document(document, tokenizer, max_tokens=48, overlap=8)
    assert len(pieces) > 3 and pieces[1].source == "notes.txt#chunk1"
    assert all(piece.id == document_id("text", piece.text) for piece in pieces)
    assert chunk_document(Document.make("n", "text", "Short."), tokenizer) == [Document.make("n", "text", "Short.")]
    pair = Document.make("n", "qa", question="Q?", answer="A.")
    assert chunk_document(pair, tokenizer, max_tokens=2, overlap=0) == [pair]


def test_chunk_documents_keeps_order_and_drops_repeats(tokenizer):
    long = Document.make("a.txt", "text", LONG_TEXT)
    short = Document.make("b.txt", "text", "Short.")
    pieces = chunk_documents([long, short, Document.make("c.txt", "text", "Short.")], tokenizer, 48, 8)
    assert pieces == chunk_document(long, tokenizer, 48, 8) + [short]
