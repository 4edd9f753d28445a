"""Operator commands on spool files: what a spool holds (`status`), and taking the pending records of another
spool file, e.g. one moved aside as corrupt, into the live one (`spool-import`).

`status` only reads (SQLite's WAL lets it beside a running bridge). `spool-import` needs the bridge stopped: it
takes the spool's ownership lock, so the two can never write at once.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmi_bridge.sinks.contract import BIGQUERY, LOG, PUBSUB
from fmi_bridge.spool import SPOOL_FILE, AdoptedStream, Spool, SpoolError

SINK_BITS = {"pubsub": PUBSUB, "bigquery": BIGQUERY, "log": LOG}


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise SpoolError(f"no spool file at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        conn.execute("SELECT count(*) FROM records").fetchone()
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot read {path} as a spool: {exc}") from exc
    return conn


def status(directory: Path) -> dict[str, Any]:
    """Per sink: records and bytes still owed and the oldest one's age; the files moved aside."""
    path = directory / SPOOL_FILE
    report: dict[str, Any] = {"spool": str(path)}
    moved = sorted(str(p) for p in directory.glob(f"{SPOOL_FILE}.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
    report["moved_aside"] = moved
    if not path.exists():
        report["records"] = 0
        report["note"] = "no spool yet"
        return report
    conn = _read_only(path)
    try:
        now = time.time()
        total, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        report["records"], report["bytes"] = total, size
        sinks: dict[str, Any] = {}
        for name, bit in SINK_BITS.items():
            count, owed, oldest = conn.execute(
                f"SELECT count(*), coalesce(sum(size), 0), min(created_at) FROM records WHERE pending & {bit}"
            ).fetchone()
            if count:
                sinks[name] = {"records": count, "bytes": owed, "oldest_age_seconds": round(now - oldest, 1)}
        report["owed"] = sinks
    finally:
        conn.close()
    return report


@dataclass(frozen=True)
class ImportResult:
    source: str
    records: int
    bytes: int
    already_imported: bool


def import_spool(spool: Spool, source: Path, stream_keys: dict[str, tuple[str, str]] | None = None) -> ImportResult:
    """Copy the source's pending records into `spool`, ahead of what it holds (they are older), in their own
    order and with what each sink still owes. One transaction; a second run of the same records does nothing.

    Exactly once into BigQuery: records the source had given Storage Write offsets (an append that may have
    landed) keep them, and the live lane takes over the source's stream, so a resend lands on the same offsets.
    `stream_keys`: table -> (the live lane's stream key, its record kind); None without the Write API.
    """
    conn = _read_only(source)
    try:
        rows = conn.execute(
            "SELECT id, kind, site_code, body, size, pending, created_at, "
            f"CASE WHEN pending & {BIGQUERY} THEN write_offset END FROM records WHERE pending != 0 ORDER BY id"
        ).fetchall()
        streams = _streams_to_adopt(conn, rows, stream_keys or {}, source)
    finally:
        conn.close()
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr((row[0], row[1], row[2], row[3], row[5])).encode("utf-8", "surrogatepass"))
    fingerprint = digest.hexdigest()
    size = sum(row[4] for row in rows)
    taken = spool.import_records(rows, fingerprint, str(source.resolve()), streams)
    return ImportResult(str(source), len(rows), size, already_imported=not taken)


def _streams_to_adopt(
    conn: sqlite3.Connection, rows: list[Any], stream_keys: dict[str, tuple[str, str]], source: Path
) -> list[AdoptedStream]:
    """The source's write streams that its imported records hold offsets on, under the live lanes' keys."""
    kinds = {row[1] for row in rows if row[7] is not None}
    if not kinds:
        return []
    adopted = []
    for key, stream, next_offset, *used_at in conn.execute("SELECT * FROM write_streams"):  # used_at: newer spools
        live = stream_keys.get(key.split(":", 1)[-1])  # a key is "<instance>:<table>"
        if live is not None:
            adopted.append(AdoptedStream(live[0], live[1], stream, next_offset, used_at[0] if used_at else None))
    missing = kinds - {stream.kind for stream in adopted}
    if missing:
        raise SpoolError(
            f"records of {source} were sent to a BigQuery write stream of a table this bridge does not write "
            f"({', '.join(sorted(missing))}); importing them could write rows twice"
        )
    return [stream for stream in adopted if stream.kind in kinds]
