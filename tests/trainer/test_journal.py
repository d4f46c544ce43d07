"""The ingestion journal: idempotent by content hash, resumable after a kill at any point."""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from engram_kernels.trainer.ingest import Document, read_sources
from engram_kernels.trainer.journal import Journal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def facts(count, start=0):
    return [Document.make(f"facts.txt#{i}", "text", f"Fact {i}: the river Ost{i} flows north.")
            for i in range(start, start + count)]


def test_add_is_a_no_op_for_known_content(tmp_path):
    with Journal(tmp_path / "journal.db") as journal:
        first, second = facts(2)
        assert journal.add(first) and journal.add(second)
        same_content_elsewhere = Document.make("other.md", "text", first.text)
        assert not journal.add(same_content_elsewhere)
        assert journal.add_many(facts(4)) == 2
        assert journal.counts() == {"pending": 4, "learned": 0, "total": 4}
        assert journal.pending() == facts(4)  # insertion order, first source kept


def test_mark_learned_and_statuses(tmp_path):
    with Journal(tmp_path / "journal.db") as journal:
        journal.add_many(facts(5))
        documents = facts(5)
        journal.mark_learned([documents[1].id, documents[3].id], version=2)
        assert journal.pending() == [documents[0], documents[2], documents[4]]
        assert journal.documents("learned") == [documents[1], documents[3]]
        assert journal.documents() == documents
        assert journal.get(documents[1].id) == (documents[1], "learned", 2)
        assert journal.get("0" * 64) is None
        assert journal.counts() == {"pending": 3, "learned": 2, "total": 5}
        with pytest.raises(ValueError, match="status"):
            journal.documents("done")


def test_mark_learned_is_all_or_nothing(tmp_path):
    with Journal(tmp_path / "journal.db") as journal:
        journal.add_many(facts(3))
        with pytest.raises(KeyError, match="1 of 2 document ids"):
            journal.mark_learned([facts(1)[0].id, "f" * 64], version=1)
        assert journal.counts()["learned"] == 0


def test_unlearn_after_a_rollback(tmp_path):
    with Journal(tmp_path / "journal.db") as journal:
        journal.add_many(facts(4))
        documents = facts(4)
        journal.mark_learned([documents[0].id], 1)
        journal.mark_learned([documents[1].id, documents[2].id], 2)
        assert journal.unlearn_after(1) == 2
        assert journal.pending() == documents[1:]


def test_reopening_keeps_everything(tmp_path):
    path = tmp_path / "deep" / "journal.db"
    with Journal(path) as journal:
        journal.add_many(facts(3))
        journal.mark_learned([facts(1)[0].id], 1)
    with Journal(path) as journal:
        assert journal.counts() == {"pending": 2, "learned": 1, "total": 3}
        assert journal.documents() == facts(3)
        mode = journal._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_re_ingesting_the_same_files_adds_nothing(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Mira Dask wrote Glass Harbors.")
    (tmp_path / "docs" / "b.jsonl").write_text('{"question": "Who wrote Glass Harbors?", "answer": "Mira Dask"}\n')
    (tmp_path / "copy.md").write_text("Mira Dask wrote Glass Harbors.\n")
    with Journal(tmp_path / "journal.db") as journal:
        assert journal.add_many(read_sources([tmp_path / "docs"])) == 2
        assert journal.add_many(read_sources([tmp_path / "docs"])) == 0
        assert journal.add_many(read_sources([tmp_path / "copy.md"])) == 0
        assert journal.counts()["total"] == 2


def test_documents_must_carry_their_content_id(tmp_path):
    forged = Document(id="0" * 64, source="x", kind="text", text="changed")
    with Journal(tmp_path / "journal.db") as journal, pytest.raises(ValueError, match="does not match"):
        journal.add(forged)


def test_not_a_journal(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not an engram journal"):
        Journal(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(ValueError, match="newer"):
        Journal(path)


# ----- crashes ---------------------------------------------------------------------------------

CHILD_HEADER = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
from engram_kernels.trainer.ingest import Document
from engram_kernels.trainer.journal import Journal

def facts(count, start=0):
    return [Document.make(f"facts.txt#{{i}}", "text", f"Fact {{i}}: the river Ost{{i}} flows north.")
            for i in range(start, start + count)]

journal = Journal(sys.argv[1])
"""


def run_child(body, *args):
    script = CHILD_HEADER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_exit_between_steps_loses_and_duplicates_nothing(tmp_path):
    path = tmp_path / "journal.db"
    # The child adds documents one by one, marks some learned, then dies without closing anything.
    child = run_child("""
        documents = facts(5)
        for document in documents[:3]:
            journal.add(document)
        journal.mark_learned([documents[0].id, documents[1].id], version=1)
        journal.add(documents[3])
        os._exit(3)
    """, path)
    assert child.returncode == 3, child.stderr
    with Journal(path) as journal:
        assert journal.counts() == {"pending": 2, "learned": 2, "total": 4}
        # resuming: ingest everything again; only the document never added is new
        assert journal.add_many(facts(5)) == 1
        assert [d.id for d in journal.pending()] == [d.id for d in facts(5)[2:]]
        journal.mark_learned([d.id for d in journal.pending()], version=2)
        assert journal.counts() == {"pending": 0, "learned": 5, "total": 5}


def test_kill_mid_transaction_leaves_whole_batches(tmp_path):
    path = tmp_path / "journal.db"
    batch = 40
    body = f"""
        start = 0
        while True:
            journal.add_many(facts({batch}, start))
            journal.mark_learned([d.id for d in facts({batch}, start)[::2]], version=start)
            start += {batch}
            if start == {batch} * 3:
                print("ready", flush=True)
    """
    script = CHILD_HEADER + textwrap.dedent(body)
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # let it get well inside later transactions
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with Journal(path) as journal:
        documents = journal.documents()
        ids = [d.id for d in documents]
        assert len(ids) == len(set(ids)) >= batch * 3
        assert len(ids) % batch == 0  # each add_many landed whole or not at all
        assert ids == [d.id for d in facts(len(ids))]
        learned = journal.counts()["learned"]
        # the last batch may have been added but not yet marked: learned is half of all or of all but one batch
        assert learned in (len(ids) // 2, (len(ids) - batch) // 2)
        assert journal.add_many(facts(len(ids) + batch)) == batch
