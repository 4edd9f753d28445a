"""The durable spool: SQLite in WAL mode, between the MQTT acknowledgement and the cloud sinks.

A record carries one bit per sink that still has to confirm it; it is deleted when no bit is left. Each
connection belongs to one thread (SQLite objects are not shared), the counters are shared under a lock.

One process owns a spool at a time (an exclusive lock on `spool.db.lock`). A reserve file of a few MiB is kept
beside it and given back when the disk fills, so a settle (which frees space) can still commit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fmi_bridge.json_text import compact

log = logging.getLogger(__name__)

READING = "reading"
REJECT = "reject"
SPOOL_FILE = "spool.db"
LOCK_FILE = f"{SPOOL_FILE}.lock"
RESERVE_FILE = f"{SPOOL_FILE}.reserve"
RESERVE_BYTES = 16 * 1024**2  # far more than the WAL frames of one settle of a few thousand records
BUSY_SECONDS = 30.0  # intake and senders take turns at the writer lock
OPEN_BUSY_SECONDS = 5.0  # at start a lock held elsewhere is a fault to report, not a wait
# Only these mean the file itself is damaged; busy, locked, full, I/O and permission errors do not.
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
PRUNE_SLICE = 50_000  # keys forgotten at most per prune: beyond any intake rate a second, a bounded delete
KNOWN_BITS = (1, 2, 4)  # every sink bit a spool may hold records for (sinks.PUBSUB, BIGQUERY, LOG)

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
CREATE TABLE IF NOT EXISTS write_streams (
    lane TEXT PRIMARY KEY,
    stream TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS seen (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    taken_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS seen_key ON seen(key);
CREATE TABLE IF NOT EXISTS imports (
    fingerprint TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    records INTEGER NOT NULL,
    imported_at REAL NOT NULL
);
"""


class SpoolError(Exception):
    """The spool cannot be used (unwritable folder, I/O error)."""


class SpoolDamagedError(SpoolError):
    """SQLite found the file damaged while running: nothing more can be trusted from it. The process exits for
    Supervisor to restart it; the next start moves the file aside (spool-import can take what is readable)."""


def spool_error(what: str, exc: sqlite3.Error) -> SpoolError:
    """The SpoolError for a failed SQLite call: SpoolDamagedError when SQLite reports the file damaged."""
    kind = SpoolDamagedError if is_corrupt(exc) else SpoolError
    return kind(f"{what}: {_describe(exc)}")


class SpoolInUseError(SpoolError):
    """Another process owns the spool (a second bridge given the same SPOOL_DIR)."""


class SpoolFullError(SpoolError):
    """No room for more records; the caller must hold its messages and try again later."""


@dataclass(frozen=True)
class AdoptedStream:
    """A Storage Write stream of an imported spool, taken over by a live lane (its key) with its next offset."""

    key: str
    kind: str
    stream: str
    next_offset: int
    used_at: float | None


@dataclass(frozen=True, slots=True)
class Record:
    id: int
    kind: str
    site_code: str | None
    body: str  # the row as stored (JSON)
    offset: int | None = None  # its place in a BigQuery write stream, once given (see offset_batch)

    @property
    def row(self) -> dict[str, Any]:
        """The row every sink derives its output from, decoded anew on each use: a record in flight holds only its
        text (kept decoded, the rows of a backlog's requests in flight were a fifth of the bridge's peak memory)."""
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


@dataclass(frozen=True)
class Entry:
    """A record to append: its kind, ordering site, and the row every sink derives its output from, as the
    JSON text to store. Make it with `entry()`, which proves the text encodes."""

    kind: str
    site_code: str | None
    body: str
    size: int
    only_sinks: int | None = None  # sink bits, when not every sink of its kind owes it (a replay to one sink)
    key: str | None = None  # the message's identity (event_id, reject_id): taken once within the dedupe horizon


def entry(
    kind: str, site_code: str | None, row: dict[str, Any], only_sinks: int | None = None, key: str | None = None
) -> Entry:
    """Raises UnicodeEncodeError (a ValueError) when a string of the row is not valid Unicode."""
    body = compact(row)
    return Entry(kind, site_code, body, len(body.encode("utf-8")), only_sinks, key)


@dataclass(frozen=True)
class DedupeHorizon:
    """How long the spool remembers the keys it took: an id is forgotten once it is both older than `seconds`
    and not among the last `count` taken. Within that, a message delivered again is acknowledged, not spooled."""

    count: int = 100_000
    seconds: float = 900.0


class TakeBackOffsets(Protocol):
    """Records whose write-stream offsets are given again, the lane's next offset then `first`."""

    @property
    def stream_key(self) -> str: ...
    @property
    def ids(self) -> list[int]: ...
    @property
    def first(self) -> int: ...


@dataclass
class _Settle:
    """One lane's settle, waiting for the transaction that commits it (Spool.settle)."""

    bit: int
    ids: list[int]
    rejects: list[tuple[str, str | None, str, int, int, float]]
    take_back: TakeBackOffsets | None
    finished: bool = False  # a writer took it: committed, or failed with `error`
    committed: bool = False
    error: sqlite3.Error | None = None


@dataclass(frozen=True)
class SpoolStats:
    records: int
    bytes: int
    oldest_age_seconds: float


@dataclass(frozen=True)
class Owed:
    """What one sink still owes: records, their bytes, and the oldest one's age."""

    records: int
    bytes: int
    oldest_age_seconds: float


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        min_free_bytes: int,
        reading_bits: int,
        reject_bits: int,
        lanes: dict[int, int] | None = None,
        offset_bits: int = 0,
        dedupe: DedupeHorizon | None = None,
    ) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.reading_bits = reading_bits
        self.reject_bits = reject_bits
        self.lanes = lanes or {}  # sink bit -> how many lanes its sites are hashed onto
        self.offset_bits = offset_bits  # sinks that give records write-stream offsets (BigQuery's Write API)
        self.dedupe = dedupe or DedupeHorizon()
        self.duplicates = 0  # entries not spooled because their key was taken before (intake's thread counts)
        self._pruned_at = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()
        # Writers of this process queue here, not in SQLite's busy handler, which sleeps in growing steps (up to
        # 100 ms) while another connection holds the write lock: with several senders that was most of their time.
        self._writer = threading.Lock()
        # Settles waiting for the writer: the next holder commits all of them in one transaction (see settle).
        self._settles: list[_Settle] = []
        self._settles_lock = threading.Lock()
        self._records = 0
        self._bytes = 0
        self._owed: dict[int, list[int]] = {}  # bit -> [records, bytes] that sink still owes
        self._owner = _lock_exclusively(directory / LOCK_FILE)
        try:
            self._open()
        except BaseException:
            self._owner.close()
            raise
        self.keep_reserve()

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, **kwargs: Any) -> Spool:
        """Open the spool. Only a corrupt one is moved aside (never deleted) for a fresh start; any other
        failure (locked, disk full, unreadable) raises SpoolError and leaves the file as it is."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {directory}: {exc}") from exc
        try:
            return cls(directory, **kwargs)
        except sqlite3.Error as exc:
            if not is_corrupt(exc):
                raise SpoolError(f"cannot open spool {directory / SPOOL_FILE}: {_describe(exc)}") from exc
            moved = cls._move_aside(directory)
            log.error(
                "spool was corrupt and was moved aside; starting a fresh one (spool-import can take its records)",
                extra={"error": _describe(exc), "moved_to": str(moved)},
            )
        try:
            return cls(directory, **kwargs)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot create a fresh spool in {directory}: {_describe(exc)}") from exc

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
        conn = self._connection(synchronous="FULL", busy_seconds=OPEN_BUSY_SECONDS)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise CorruptSpoolError(f"integrity check failed: {result}")
        except sqlite3.Error:
            self.close()
            raise
        conn.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000:.0f}")
        conn.executescript(_SCHEMA)
        if "write_offset" not in {column[1] for column in conn.execute("PRAGMA table_info(records)")}:
            conn.execute("ALTER TABLE records ADD COLUMN write_offset INTEGER")  # a spool made before it existed
        if "used_at" not in {column[1] for column in conn.execute("PRAGMA table_info(write_streams)")}:
            conn.execute("ALTER TABLE write_streams ADD COLUMN used_at REAL")  # unknown for older streams
        conn.execute("CREATE INDEX IF NOT EXISTS offsets_given ON records(kind, id) WHERE write_offset IS NOT NULL")
        for bit in _bits(self.reading_bits | self.reject_bits):
            conn.execute(f"CREATE INDEX IF NOT EXISTS pending_{bit} ON records(id) WHERE pending & {bit}")
        for bit in self.lanes:
            self._index_sites(conn, bit)
        for bit in _bits(self.reading_bits & self.reject_bits):
            # A sink that takes both kinds drains them in lanes of their own: one per kind.
            conn.execute(f"CREATE INDEX IF NOT EXISTS pending_{bit}_kind ON records(kind, id) WHERE pending & {bit}")
        count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        self._records, self._bytes = count, size
        for bit in KNOWN_BITS:
            owed = conn.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM records WHERE pending & {bit}"
            ).fetchone()
            self._owed[bit] = list(owed)

    @staticmethod
    def _index_sites(conn: sqlite3.Connection, bit: int) -> None:
        """An index per (site, id) of the records this sink owes: a site's next records, and the sites that have
        any, are index seeks, however large another site's backlog."""
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE ?", (f"pending_{bit}_lanes_%",)
        ).fetchall():
            conn.execute(f"DROP INDEX {name}")  # the (lane, id) index of earlier versions
        conn.execute(f"CREATE INDEX IF NOT EXISTS pending_{bit}_sites ON records(site_code, id) WHERE pending & {bit}")

    def _connection(self, synchronous: str = "NORMAL", busy_seconds: float = 0.0) -> sqlite3.Connection:
        """This thread's connection; the first call in a thread sets its durability for good."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            timeout = busy_seconds or BUSY_SECONDS
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=True)
            conn.create_function("lane_of", 2, lane_of, deterministic=True)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL for the intake connection: an acknowledged message must survive a power cut.
            # Senders only delete; losing one of their commits means a resend, never a loss.
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def release(self) -> None:
        """Close this thread's connection and give up ownership (other threads' connections must be closed)."""
        self.close()
        self._owner.close()

    # -- disk reserve -----------------------------------------------------------------------------------------

    def keep_reserve(self) -> None:
        """Hold RESERVE_BYTES of disk for settling, when the disk has that much to spare."""
        reserve = self.directory / RESERVE_FILE
        try:
            if reserve.exists() or shutil.disk_usage(self.directory).free < RESERVE_BYTES + self.min_free_bytes:
                return
            descriptor = os.open(reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(descriptor, 0, RESERVE_BYTES)
            finally:
                os.close(descriptor)
        except OSError:
            reserve.unlink(missing_ok=True)  # a half-made reserve is only taken space

    def _give_back_reserve(self) -> bool:
        reserve = self.directory / RESERVE_FILE
        if not reserve.exists():
            return False
        reserve.unlink(missing_ok=True)
        log.warning("disk is full: gave back the spool's reserve so confirmed records can be settled")
        return True

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
        problem = self.room_problem(entries[0].size)
        if problem is None:
            self.keep_reserve()
        if problem:
            raise SpoolFullError(problem)
        conn = self._connection(synchronous="FULL")
        try:
            with self._transaction(conn):
                taken, rows, keys = self._new_entries(conn, entries)
                self._insert(conn, rows)
                self._remember(conn, keys)
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
                raise SpoolFullError(f"disk full: {exc}") from exc
            raise spool_error("spool write failed", exc) from exc
        self.duplicates += taken - len(rows)
        self._count(len(rows), sum(row[3] for row in rows), _owed_by_rows((row[4], row[3]) for row in rows))
        return taken

    def _new_entries(
        self, conn: sqlite3.Connection, entries: Sequence[Entry]
    ) -> tuple[int, list[tuple[str, str | None, str, int, int, float]], list[str]]:
        """How many entries, from the first on, this append takes; the rows of those not taken before (by key,
        in the spool's memory or earlier in the same group) that fit; and their keys. A duplicate takes no room
        and counts as taken: it is acknowledged like the first delivery."""
        wanted = [e.key for e in entries if e.key is not None]
        known = (
            {key for (key,) in conn.execute(f"SELECT key FROM seen WHERE key IN ({_marks(len(wanted))})", wanted)}
            if wanted
            else set()
        )
        now = time.time()
        room = self.max_bytes - self._bytes
        taken, rows, keys = 0, [], []
        for e in entries:
            if e.key is None or e.key not in known:
                room -= e.size
                if room < 0:
                    break
                rows.append((e.kind, e.site_code, e.body, e.size, self._bits_for(e), now))
                if e.key is not None:
                    known.add(e.key)
                    keys.append(e.key)
            taken += 1
        return taken, rows, keys

    def _remember(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        """The keys taken, in the transaction of their records (a kill -9 keeps both or neither); what is past the
        horizon is forgotten a bounded slice at a time, at most once a second."""
        now = time.time()
        conn.executemany("INSERT INTO seen (key, taken_at) VALUES (?, ?)", [(key, now) for key in keys])
        if now - self._pruned_at < 1.0:
            return
        self._pruned_at = now
        (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM seen").fetchone()
        conn.execute(
            "DELETE FROM seen WHERE seq IN (SELECT seq FROM seen WHERE seq <= ? ORDER BY seq LIMIT ?) AND taken_at < ?",
            (last - self.dedupe.count, PRUNE_SLICE, now - self.dedupe.seconds),
        )

    def _rows(self, entries: Iterable[Entry]) -> list[tuple[str, str | None, str, int, int, float]]:
        now = time.time()
        return [(e.kind, e.site_code, e.body, e.size, self._bits_for(e), now) for e in entries]

    def _bits_for(self, e: Entry) -> int:
        bits = self.reading_bits if e.kind == READING else self.reject_bits
        return bits if e.only_sinks is None else bits & e.only_sinks

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[str, str | None, str, int, int, float]]) -> None:
        conn.executemany(
            "INSERT INTO records (kind, site_code, body, size, pending, created_at) VALUES (?, ?, ?, ?, ?, ?)", rows
        )

    def _count(self, records: int, size: int, owed: dict[int, tuple[int, int]]) -> None:
        """Move the shared counters, after a commit only."""
        with self._lock:
            self._records += records
            self._bytes += size
            for bit, (count, owed_bytes) in owed.items():
                now = self._owed.setdefault(bit, [0, 0])
                now[0] += count
                now[1] += owed_bytes

    def import_records(
        self,
        rows: Sequence[tuple[Any, ...]],
        fingerprint: str,
        source: str,
        streams: Sequence[AdoptedStream] = (),
    ) -> bool:
        """Take (id, kind, site_code, body, size, pending, created_at, write_offset) rows of another spool ahead
        of the records held here, in their order; False when rows with this fingerprint were imported before.
        Rows with offsets keep them, and their lanes take over the source's `streams` (see commands/spool_admin.py)."""
        size = sum(row[4] for row in rows)
        if self._bytes + size > self.max_bytes:
            raise SpoolFullError(
                f"{size} bytes to import, but SPOOL_MAX_BYTES leaves {self.max_bytes - self._bytes} bytes free"
            )
        conn = self._connection(synchronous="FULL")
        with self._transaction(conn):
            if conn.execute("SELECT 1 FROM imports WHERE fingerprint = ?", (fingerprint,)).fetchone():
                return False
            for stream in streams:
                if self.offsets_given(self.offset_bits, stream.kind):  # on this thread's connection: in the transaction
                    raise SpoolError(
                        "this spool holds BigQuery appends not yet confirmed; run the bridge until `status` shows "
                        "nothing owed to BigQuery, stop it, and import again"
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO write_streams VALUES (?, ?, ?, ?)",
                    (stream.key, stream.stream, stream.next_offset, stream.used_at),
                )
            first = conn.execute("SELECT coalesce(min(id), 1) FROM records").fetchone()[0] - len(rows)
            conn.executemany(
                "INSERT INTO records (id, kind, site_code, body, size, pending, created_at, write_offset) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [(first + index, *row[1:]) for index, row in enumerate(rows)],
            )
            conn.execute("INSERT INTO imports VALUES (?, ?, ?, ?)", (fingerprint, source, len(rows), time.time()))
        self._count(len(rows), size, _owed_by_rows((row[5], row[4]) for row in rows))
        return True

    # -- senders --------------------------------------------------------------------------------------------

    def pending(
        self,
        bit: int,
        limit: int,
        *,
        kind: str | None = None,
        lane: int | None = None,
        site: str | None = None,
        max_bytes: int | None = None,
    ) -> list[Record]:
        """Oldest records still waiting for the sink with this bit (of one kind, of one lane's sites or of one
        site, if given), in spool order; at most `limit` records and, past the first, at most `max_bytes`."""
        sql = f"SELECT id, kind, site_code, body, size FROM records WHERE pending & {int(bit)}"
        params: list[Any] = []
        if lane is not None:
            sql += " AND site_code IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(self.sites_of_lane(bit, lane), ensure_ascii=False))
        if site is not None:
            sql += " AND site_code = ?"
            params.append(site)
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        records: list[Record] = []
        total = 0
        for row in self._connection().execute(sql, params):
            total += row[4]
            if records and max_bytes is not None and total > max_bytes:
                break
            records.append(_record(row))
        return records

    def pending_sites(self, bit: int) -> list[tuple[str, int]]:
        """Every site with records owed to this sink, and the id of its oldest: one index seek a site (a loose
        index scan), not a read of the records."""
        b = int(bit)
        sql = f"""
            WITH RECURSIVE sites(site) AS (
                SELECT min(site_code) FROM records WHERE pending & {b}
                UNION ALL
                SELECT (SELECT min(site_code) FROM records WHERE pending & {b} AND site_code > site)
                FROM sites WHERE site IS NOT NULL
            )
            SELECT site, (SELECT min(id) FROM records WHERE pending & {b} AND site_code = site)
            FROM sites WHERE site IS NOT NULL"""
        return [(site, first) for site, first in self._connection().execute(sql)]

    def sites_of_lane(self, bit: int, lane: int) -> list[str]:
        return [site for site, _ in self.pending_sites(bit) if lane_of(site, self.lanes[bit]) == lane]

    def count_pending(self, bit: int, kind: str | None = None, lane: int | None = None) -> int:
        sql = f"SELECT count(*) FROM records WHERE pending & {int(bit)}"
        if lane is not None:
            sites = json.dumps(self.sites_of_lane(bit, lane), ensure_ascii=False)
            return int(self._observe(f"{sql} AND site_code IN (SELECT value FROM json_each(?))", (sites,))[0])
        if kind is None:
            return int(self._observe(sql)[0])
        return int(self._observe(sql + " AND kind = ?", (kind,))[0])

    def settle(
        self,
        bit: int,
        done: Sequence[int],
        dead_letters: Sequence[tuple[int, dict[str, Any]]] = (),
        take_back: TakeBackOffsets | None = None,
    ) -> None:
        """The sink confirmed `done`, and refused `dead_letters` for good (each becomes a reject record); with
        `take_back`, the offsets of those records are given again from its first. Returns once it is committed.

        One transaction: a refused reading's reject record exists before its bit is cleared, and no crash can
        land between a take-back and the settle of the same append's other records. A full disk gives back the
        reserve and tries once more; SpoolError if it still fails (the caller keeps the ids and retries).

        Settles of several lanes that wait for the writer at once are committed together (a group commit): a
        site's records are interleaved with every other site's, so a lane's settle of one site rewrote nearly
        every page the next lane's settle rewrote again (alone 33 µs a record for one site's 120, together
        9 µs for ten sites'). A group that fails is settled again one by one, so one settle's fault stays its own.
        """
        ids = list(done) + [record_id for record_id, _ in dead_letters]
        if not ids and take_back is None:
            return
        waiting = _Settle(bit, ids, self._rows(entry(REJECT, None, row) for _, row in dead_letters), take_back)
        with self._settles_lock:
            self._settles.append(waiting)
        with self._writer:
            if not waiting.finished:  # else a writer before this one committed it with its own
                with self._settles_lock:
                    group, self._settles = self._settles, []
                self._settle_group(group)
        if not waiting.committed:
            error = waiting.error or sqlite3.OperationalError("the writer that took this settle stopped before it")
            raise spool_error("settle failed", error) from waiting.error

    def _settle_group(self, group: list[_Settle]) -> None:
        """Under the writer lock: the group in one transaction, or when that fails, each settle in its own."""
        try:
            self._settle_together(group)
        except sqlite3.Error as exc:
            if len(group) == 1:
                group[0].error = exc
            else:
                for alone in group:
                    try:
                        self._settle_together([alone])
                    except sqlite3.Error as own:
                        alone.error = own
        finally:
            for waiting in group:
                waiting.finished = True

    def _settle_together(self, group: list[_Settle]) -> None:
        conn = self._connection()
        try:
            cleared = self._commit_settles(conn, group)
        except sqlite3.Error as exc:
            if not (exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL and self._give_back_reserve()):
                raise
            cleared = self._commit_settles(conn, group)
        for waiting, (sizes, removed) in zip(group, cleared, strict=True):
            waiting.committed = True
            self._count_cleared(waiting.bit, sizes, removed, waiting.rejects)

    def _commit_settles(self, conn: sqlite3.Connection, group: list[_Settle]) -> list[tuple[list[Any], list[Any]]]:
        cleared = []
        with self._committed(conn):
            for waiting in group:
                if waiting.take_back is not None:
                    back = waiting.take_back
                    self._take_back(conn, back.stream_key, back.ids, back.first)
                # No room check: a dead letter replaces the reading it came from.
                self._insert(conn, waiting.rejects)
                cleared.append(self._clear(conn, waiting.bit, waiting.ids))
        return cleared

    def _clear(self, conn: sqlite3.Connection, bit: int, ids: list[int]) -> tuple[list[Any], list[Any]]:
        """The sink's bit cleared on these records, and those no sink owes any more deleted: (cleared sizes,
        removed sizes), for the counts once the transaction commits."""
        if not ids:
            return [], []
        chosen = json.dumps(ids)
        # Records only this sink still owed go at once: updating them first rewrote each row and its indexes
        # just before deleting it.
        removed = conn.execute(
            f"DELETE FROM records WHERE pending = {int(bit)} AND id IN (SELECT value FROM json_each(?)) RETURNING size",
            (chosen,),
        ).fetchall()
        # A sink that gives offsets is done with them once it has settled the record.
        offset = "NULL" if bit & self.offset_bits else "write_offset"
        kept = conn.execute(
            f"UPDATE records SET pending = pending & ~{int(bit)}, write_offset = {offset} "
            f"WHERE pending & {int(bit)} AND id IN (SELECT value FROM json_each(?)) RETURNING size",
            (chosen,),
        ).fetchall()
        return removed + kept, removed

    def _count_cleared(
        self,
        bit: int,
        cleared: list[Any],
        removed: list[Any],
        rejects: Sequence[tuple[str, str | None, str, int, int, float]] = (),
    ) -> None:
        owed = _owed_by_rows((row[4], row[3]) for row in rejects)
        count, cleared_bytes = owed.get(bit, (0, 0))
        owed[bit] = (count - len(cleared), cleared_bytes - sum(size for (size,) in cleared))
        self._count(
            len(rejects) - len(removed), sum(row[3] for row in rejects) - sum(size for (size,) in removed), owed
        )

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT under this process's writer lock, rolled back on any error."""
        with self._writer, self._committed(conn):
            yield

    @staticmethod
    @contextmanager
    def _committed(conn: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: the write lock is taken up front. The caller holds
        the process's writer lock."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back by itself (disk full); a second ROLLBACK would hide the cause.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _bookkeeping(self, what: str) -> Iterator[sqlite3.Connection]:
        """A sender's own bookkeeping in one transaction; a failure (disk full, I/O) is a SpoolError naming it,
        which the sender retries after a backoff."""
        conn = self._connection()
        try:
            with self._transaction(conn):
                yield conn
        except sqlite3.Error as exc:
            raise spool_error(f"{what} failed", exc) from exc

    # -- write-stream offsets (exactly-once into BigQuery) -----------------------------------------------------

    def write_stream(self, lane: str) -> tuple[str, float | None] | None:
        """The lane's stream and when an append last landed on it (None: not known, a spool of an older version)."""
        row = self._connection().execute("SELECT stream, used_at FROM write_streams WHERE lane = ?", (lane,)).fetchone()
        return (str(row[0]), row[1]) if row else None

    def write_stream_used(self, lane: str, at: float) -> None:
        with self._bookkeeping("recording a write stream's use") as conn:
            conn.execute("UPDATE write_streams SET used_at = ? WHERE lane = ?", (at, lane))

    def offsets_given(self, bit: int, kind: str) -> bool:
        """Whether records of this lane hold stream offsets: an append not yet known to have landed."""
        row = self._connection().execute(f"SELECT 1 FROM records WHERE {_given(bit)} LIMIT 1", (kind,)).fetchone()
        return row is not None

    def start_write_stream(
        self, lane: str, stream: str, bit: int, kind: str, at: float, *, landed: Sequence[int] = ()
    ) -> None:
        """A new stream for the lane: offsets start at 0, and offsets given on an old stream are dropped; `landed`
        (records the old stream was found to hold) are settled in the same transaction, so a crash cannot leave
        them owed without their offsets (they would be written again)."""
        with self._bookkeeping("recording a new write stream") as conn:
            cleared, removed = self._clear(conn, bit, list(landed))
            conn.execute("INSERT OR REPLACE INTO write_streams VALUES (?, ?, 0, ?)", (lane, stream, at))
            conn.execute(f"UPDATE records SET write_offset = NULL WHERE {_given(bit)}", (kind,))
        self._count_cleared(bit, cleared, removed)

    def given_records(self, bit: int, kind: str) -> list[Record]:
        """The lane's records holding offsets: sent (or about to be), not known to have landed."""
        rows = self._connection().execute(
            f"SELECT id, kind, site_code, body, size, write_offset FROM records WHERE {_given(bit)} ORDER BY id",
            (kind,),
        )
        return [_record(row) for row in rows.fetchall()]

    def offset_batch(self, lane: str, bit: int, kind: str, limit: int, max_bytes: int) -> list[Record]:
        """The lane's next batch, every record with its stream offset, committed before anything is sent.

        Records already given offsets (a batch sent before a crash, or not yet confirmed) come back as they were,
        so a resend lands on the same offsets and the stream refuses what it already holds. Otherwise the oldest
        records get the stream's next offsets.
        """
        if given := self.given_records(bit, kind):
            return given
        conn = self._connection()
        batch = self.pending(bit, limit, kind=kind, max_bytes=max_bytes)
        if not batch:
            return []
        # On disk before the append leaves: with NORMAL a power cut can roll the assignment back after the rows
        # landed, and a later, larger batch from the same offset would be settled whole on ALREADY_EXISTS.
        # (SQLite, PRAGMA synchronous: in WAL mode NORMAL commits "might roll back following a power loss".)
        conn.execute("PRAGMA synchronous=FULL")
        try:
            with self._bookkeeping("giving stream offsets") as conn:
                (first,) = conn.execute("SELECT next_offset FROM write_streams WHERE lane = ?", (lane,)).fetchone()
                # One statement for the batch: the id's place in the JSON array (its key) is its offset from `first`.
                conn.execute(
                    "UPDATE records SET write_offset = ? + given.key FROM json_each(?) AS given "
                    "WHERE records.id = given.value",
                    (first, json.dumps([record.id for record in batch])),
                )
                conn.execute("UPDATE write_streams SET next_offset = ? WHERE lane = ?", (first + len(batch), lane))
        finally:
            conn.execute("PRAGMA synchronous=NORMAL")  # a lost settle only means a resend, which the offsets cure
        return [Record(r.id, r.kind, r.site_code, r.body, first + index) for index, r in enumerate(batch)]

    @staticmethod
    def _take_back(conn: sqlite3.Connection, lane: str, ids: Sequence[int], first: int) -> None:
        """The stream refused an append whole (e.g. a bad row): its records get offsets again from `first`."""
        conn.execute(
            "UPDATE records SET write_offset = NULL WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(ids)),),
        )
        conn.execute("UPDATE write_streams SET next_offset = ? WHERE lane = ?", (first, lane))

    # -- observation ----------------------------------------------------------------------------------------

    def _observe(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """One read on a connection of its own, closed at once: safe from any thread (health, metrics, stats),
        and no connection left behind by a short-lived thread."""
        with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)) as conn:
            conn.create_function("lane_of", 2, lane_of, deterministic=True)
            return conn.execute(sql, params).fetchone()

    def stats(self) -> SpoolStats:
        # The head of the spool, through the primary key: min(created_at) would read every record.
        row = self._observe("SELECT created_at FROM records ORDER BY id LIMIT 1")
        age = max(0.0, time.time() - row[0]) if row and row[0] is not None else 0.0
        with self._lock:
            return SpoolStats(self._records, self._bytes, age)

    def owed(self, bit: int) -> Owed:
        row = self._observe(f"SELECT created_at FROM records WHERE pending & {int(bit)} ORDER BY id LIMIT 1")
        age = max(0.0, time.time() - row[0]) if row and row[0] is not None else 0.0
        with self._lock:
            count, size = self._owed.get(bit, (0, 0))
        return Owed(count, size, age)

    def writable(self) -> bool:
        return os.access(self.directory, os.W_OK) and self.room_problem() is None


class CorruptSpoolError(sqlite3.DatabaseError):
    """The file opened, but SQLite's own check found it damaged."""


def is_corrupt(exc: sqlite3.Error) -> bool:
    return isinstance(exc, CorruptSpoolError) or (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT_CODES


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name}: {exc}" if name else str(exc)


def _lock_exclusively(path: Path) -> Any:
    """Own the spool for this process's life; the lock goes with the process, however it ends."""
    try:
        handle = path.open("a+")
    except OSError as exc:
        raise SpoolError(f"cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SpoolInUseError(f"spool {path.parent} is in use by another process (pid {holder})") from None
    try:  # the pid only helps the message above; a full disk must not stop start-up here
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
    except OSError:
        pass
    return handle


def _record(row: tuple[Any, ...]) -> Record:
    return Record(row[0], row[1], row[2], row[3], row[5] if len(row) > 5 else None)


def lane_of(site_code: str | None, lanes: int) -> int:
    """The lane a site's records travel in: stable across processes, so one site never has two."""
    if not site_code:
        return 0
    return zlib.crc32(site_code.encode("utf-8", "surrogatepass")) % lanes


def _owed_by_rows(bits_and_sizes: Iterable[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Per sink bit: how many records, and their bytes, these (pending bits, size) pairs add."""
    owed: dict[int, tuple[int, int]] = {}
    for bits, size in bits_and_sizes:
        for bit in _bits(bits):
            count, total = owed.get(bit, (0, 0))
            owed[bit] = (count + 1, total + size)
    return owed


def _bits(mask: int) -> list[int]:
    return [1 << shift for shift in range(mask.bit_length()) if mask & (1 << shift)]


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _given(bit: int) -> str:
    """Records of one kind (the `?` parameter) holding offsets of the sink with `bit`: sent, not yet settled."""
    return f"write_offset IS NOT NULL AND kind = ? AND pending & {int(bit)}"
