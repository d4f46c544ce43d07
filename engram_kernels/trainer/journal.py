"""What has been ingested and learned, in SQLite: a document registry keyed by content hash.

Every state change is one committed transaction (WAL mode), so a process killed at any moment leaves
the journal as it was before or after that change, never in between: re-running `learn` resumes with
the pending documents, and re-ingesting content already present adds nothing.
"""
import contextlib
import sqlite3
import time
from pathlib import Path

from .ingest import Document, document_id

STATUSES = ("pending", "learned")
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('text', 'qa')),
    text TEXT NOT NULL,
    question TEXT,
    answer TEXT,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'learned')),
    version INTEGER,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_status ON documents (status);
"""
DOCUMENT_COLUMNS = "id, source, kind, text, question, answer"


class Journal:
    """Documents with status 'pending' or 'learned' (and the memory version they were learned into)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are opened explicitly by _transaction, one per state change
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._create_schema()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise ValueError(f"{self.path}: not an engram journal ({error})") from None

    def _create_schema(self):
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"journal schema {version} is newer than this engram ({SCHEMA_VERSION})")
        with self._transaction():
            for statement in filter(str.strip, SCHEMA.split(";")):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, document: Document) -> bool:
        """Register a document as pending; False (and nothing changes) when its content is already here."""
        return self.add_many([document]) == 1

    def add_many(self, documents) -> int:
        """Register documents in one transaction; returns how many were new."""
        rows = [_row(document) for document in documents]
        now = time.time()
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                f"INSERT OR IGNORE INTO documents ({DOCUMENT_COLUMNS}, added_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row + (now,) for row in rows])
            return self._db.total_changes - before

    def pending(self) -> list[Document]:
        """Documents not learned yet, in the order they were added."""
        return self.documents("pending")

    def documents(self, status=None) -> list[Document]:
        """All documents (or those with `status`), in the order they were added."""
        if status is None:
            rows = self._db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents ORDER BY rowid")
        else:
            _check_status(status)
            rows = self._db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE status = ? ORDER BY rowid",
                                    (status,))
        return [Document(*row) for row in rows]

    def get(self, document_id_: str):
        """(Document, status, version) for an id, or None."""
        row = self._db.execute(f"SELECT {DOCUMENT_COLUMNS}, status, version FROM documents WHERE id = ?",
                               (document_id_,)).fetchone()
        return None if row is None else (Document(*row[:6]), row[6], row[7])

    def mark_learned(self, document_ids, version: int):
        """Mark documents learned into memory `version`, all or none; unknown ids raise KeyError."""
        ids = list(dict.fromkeys(document_ids))
        with self._transaction():
            self._db.executemany("UPDATE documents SET status = 'learned', version = ? WHERE id = ?",
                                 [(int(version), doc_id) for doc_id in ids])
            known = self._count_ids(ids)
            if known != len(ids):
                raise KeyError(f"{len(ids) - known} of {len(ids)} document ids are not in the journal {self.path}")

    def unlearn_after(self, version: int) -> int:
        """Documents learned into versions after `version` become pending again (after a rollback)."""
        with self._transaction():
            cursor = self._db.execute(
                "UPDATE documents SET status = 'pending', version = NULL WHERE status = 'learned' AND version > ?",
                (int(version),))
            return cursor.rowcount

    def counts(self) -> dict:
        """{"pending": n, "learned": n, "total": n}."""
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(self._db.execute("SELECT status, COUNT(*) FROM documents GROUP BY status"))
        counts["total"] = sum(counts[status] for status in STATUSES)
        return counts

    def _count_ids(self, ids):
        found = 0
        for begin in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            batch = ids[begin:begin + 500]
            marks = ",".join("?" * len(batch))
            found += self._db.execute(f"SELECT COUNT(*) FROM documents WHERE id IN ({marks})", batch).fetchone()[0]
        return found


def _row(document):
    expected = document_id(document.kind, document.text, document.question, document.answer)
    if document.id != expected:
        raise ValueError(f"{document.source}: document id {document.id[:12]}... does not match its content "
                         "(build documents with Document.make)")
    return (document.id, document.source, document.kind, document.text, document.question, document.answer)


def _check_status(status):
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
