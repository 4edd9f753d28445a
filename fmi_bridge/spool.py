"""The durable spool: SQLite in WAL mode, between the MQTT acknowledgement and the cloud sinks.

A record carries one bit per sink that still has to confirm it; it is deleted when no bit is left. Each
connection belongs to one thread (SQLite objects are not shared), the counters are shared under a lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

READING = "reading"
REJECT = "reject"
SPOOL_FILE = "spool.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    site_code TEXT,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""


class SpoolError(Exception):
    """The spool cannot be used (unwritable folder, I/O error)."""


class SpoolFullError(SpoolError):
    """No room for more records; the caller must hold its messages and try again later."""


@dataclass(frozen=True)
class Record:
    id: int
    kind: str
    site_code: str | None
    row: dict[str, Any]


@dataclass(frozen=True)
class Entry:
    """A record to append: its kind, ordering site and the row every sink derives its output from."""

    kind: str
    site_code: str | None
    row: dict[str, Any]


@dataclass(frozen=True)
class SpoolStats:
    records: int
    bytes: int
    oldest_age_seconds: float


class Spool:
    def __init__(
        self, directory: Path, *, max_bytes: int, min_free_bytes: int, reading_bits: int, reject_bits: int
    ) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.reading_bits = reading_bits
        self.reject_bits = reject_bits
        self._local = threading.local()
        self._lock = threading.Lock()
        self._records = 0
        self._bytes = 0
        self._open()

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, **kwargs: Any) -> Spool:
        """Open the spool, moving a corrupt one aside (never deleting it) and starting afresh."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {directory}: {exc}") from exc
        try:
            return cls(directory, **kwargs)
        except sqlite3.DatabaseError as exc:
            moved = cls._move_aside(directory)
            log.error(
                "spool was unreadable and was moved aside; starting a fresh one",
                extra={"error": str(exc), "moved_to": str(moved)},
            )
            return cls(directory, **kwargs)

    @staticmethod
    def _move_aside(directory: Path) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = directory / f"{SPOOL_FILE}.corrupt-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            source = directory / f"{SPOOL_FILE}{suffix}"
            if source.exists():
                source.rename(directory / f"{target.name}{suffix}")
        return target

    def _open(self) -> None:
        conn = self._connection(synchronous="FULL")
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            conn.close()
            self._local.conn = None
            raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        conn.executescript(_SCHEMA)
        for bit in _bits(self.reading_bits | self.reject_bits):
            conn.execute(f"CREATE INDEX IF NOT EXISTS pending_{bit} ON records(id) WHERE pending & {bit}")
        count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        self._records, self._bytes = count, size

    def _connection(self, synchronous: str = "NORMAL") -> sqlite3.Connection:
        """This thread's connection; the first call in a thread sets its durability for good."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL for the intake connection: an acknowledged message must survive a power cut.
            # Senders only delete; losing one of their commits means a resend, never a loss.
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- intake ---------------------------------------------------------------------------------------------

    def room_problem(self, incoming_bytes: int = 0) -> str | None:
        """Why the spool cannot take more now, or None."""
        if self._bytes + incoming_bytes > self.max_bytes:
            return f"spool holds {self._bytes} bytes, limit {self.max_bytes}"
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError as exc:
            return f"cannot read free disk space: {exc}"
        if free < self.min_free_bytes:
            return f"only {free} bytes free on disk, at least {self.min_free_bytes} needed"
        return None

    def append(self, entries: Sequence[Entry]) -> int:
        """Commit, in one transaction, as many entries (from the first on) as there is room for; return how
        many. Raise SpoolFullError when not even the first fits, SpoolError when the write fails."""
        if not entries:
            return 0
        rows = self._rows(entries)
        problem = self.room_problem(rows[0][3])
        if problem:
            raise SpoolFullError(problem)
        room = self.max_bytes - self._bytes
        fitting = 0
        for row in rows:
            room -= row[3]
            if room < 0:
                break
            fitting += 1
        rows = rows[:fitting]
        conn = self._connection(synchronous="FULL")
        try:
            with _transaction(conn):
                self._insert(conn, rows)
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise SpoolFullError(f"disk full: {exc}") from exc
            raise SpoolError(f"spool write failed: {exc}") from exc
        self._count(len(rows), sum(row[3] for row in rows))
        return len(rows)

    def _rows(self, entries: Iterable[Entry]) -> list[tuple[str, str | None, str, int, int, float]]:
        now = time.time()
        rows = []
        for entry in entries:
            body = json.dumps(entry.row, separators=(",", ":"), ensure_ascii=False)
            bits = self.reading_bits if entry.kind == READING else self.reject_bits
            rows.append((entry.kind, entry.site_code, body, len(body.encode("utf-8")), bits, now))
        return rows

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[str, str | None, str, int, int, float]]) -> None:
        conn.executemany(
            "INSERT INTO records (kind, site_code, body, size, pending, created_at) VALUES (?, ?, ?, ?, ?, ?)", rows
        )

    def _count(self, records: int, size: int) -> None:
        """Move the shared counters, after a commit only."""
        with self._lock:
            self._records += records
            self._bytes += size

    # -- senders --------------------------------------------------------------------------------------------

    def pending(self, bit: int, limit: int, exclude_sites: Iterable[str] = ()) -> list[Record]:
        """Oldest records still waiting for the sink with this bit, in spool order."""
        excluded = sorted(set(exclude_sites))
        sql = f"SELECT id, kind, site_code, body FROM records WHERE pending & {int(bit)}"
        params: list[Any] = []
        if excluded:
            sql += " AND (site_code IS NULL OR site_code NOT IN (SELECT value FROM json_each(?)))"
            params.append(json.dumps(excluded))
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [_record(row) for row in self._connection().execute(sql, params)]

    def first_pending_for_site(self, bit: int, site_code: str) -> Record | None:
        row = (
            self._connection()
            .execute(
                f"SELECT id, kind, site_code, body FROM records WHERE pending & {int(bit)} AND site_code = ? "
                "ORDER BY id LIMIT 1",
                (site_code,),
            )
            .fetchone()
        )
        return _record(row) if row else None

    def count_pending(self, bit: int) -> int:
        return int(self._connection().execute(f"SELECT count(*) FROM records WHERE pending & {int(bit)}").fetchone()[0])

    def settle(self, bit: int, done: Sequence[int], dead_letters: Sequence[tuple[int, dict[str, Any]]] = ()) -> None:
        """The sink confirmed `done`, and refused `dead_letters` for good (each becomes a reject record).

        One transaction: a refused reading's reject record exists before its bit is cleared.
        """
        ids = list(done) + [record_id for record_id, _ in dead_letters]
        if not ids:
            return
        conn = self._connection()
        rejects = self._rows(Entry(REJECT, None, row) for _, row in dead_letters)
        with _transaction(conn):
            # No room check: a dead letter replaces the reading it came from.
            self._insert(conn, rejects)
            conn.execute(
                f"UPDATE records SET pending = pending & ~{int(bit)} WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            )
            removed = conn.execute(
                "DELETE FROM records WHERE pending = 0 AND id IN (SELECT value FROM json_each(?)) RETURNING size",
                (json.dumps(ids),),
            ).fetchall()
        self._count(len(rejects) - len(removed), sum(row[3] for row in rejects) - sum(size for (size,) in removed))

    # -- observation ----------------------------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        row = self._connection().execute("SELECT created_at FROM records ORDER BY id LIMIT 1").fetchone()
        age = max(0.0, time.time() - row[0]) if row else 0.0
        with self._lock:
            return SpoolStats(self._records, self._bytes, age)

    def writable(self) -> bool:
        return os.access(self.directory, os.W_OK) and self.room_problem() is None


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: the writer lock is taken up front."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _record(row: tuple[int, str, str | None, str]) -> Record:
    return Record(row[0], row[1], row[2], json.loads(row[3]))


def _bits(mask: int) -> list[int]:
    return [1 << shift for shift in range(mask.bit_length()) if mask & (1 << shift)]
