"""Re-drive rejects once their cause is fixed: rows of one reason are read back from the rejects table, each raw
payload is validated again with today's rules, and the valid ones go into the spool as readings, with the
event_id they had (topic and payload unchanged), so downstream deduplication still holds. What was replayed is
marked in `<rejects table>_replayed`, and a second run skips it.

Marks are written after the spool has the readings: a crash between the two replays those rows again on the
next run (the same event_ids; at least once, as everywhere else), never loses them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.cloud import bigquery

from fmi_bridge import cloud
from fmi_bridge.config import Config
from fmi_bridge.events import reading_row, rfc3339
from fmi_bridge.partition_window import PartitionWindow
from fmi_bridge.readings import REASONS, Inbound, Reading, validate
from fmi_bridge.sinks import bigquery_insert_all, pubsub
from fmi_bridge.sinks.contract import BIGQUERY, PUBSUB
from fmi_bridge.spool import READING, Spool, SpoolFullError, entry

MARKS_PER_REQUEST = 500
PAGE_ROWS = 5000  # rejects read, validated, spooled and marked at a time
DEAD_LETTERS_OF = {pubsub.DEAD_LETTER_REASON: PUBSUB, bigquery_insert_all.DEAD_LETTER_REASON: BIGQUERY}
REPLAYABLE_REASONS = frozenset(REASONS) | set(DEAD_LETTERS_OF)  # every reason the bridge writes
ORIGINAL_CHANGED = "payload_not_original"  # the stored text no longer gives the original bytes (e.g. truncated)


@dataclass
class ReplayResult:
    reason: str
    matched: int = 0  # rows of that reason in the time window
    skipped: int = 0  # replayed by an earlier run
    replayed: int = 0  # valid now, in the spool
    still_rejected: dict[str, int] = field(default_factory=dict)  # by today's reason
    dry_run: bool = False


def replayed_table(config: Config) -> str:
    return cloud.table_id(config, f"{config.bigquery_rejects_table}_replayed")


def replay(
    config: Config,
    client: Any,
    spool: Spool | None,
    reason: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    page_rows: int = PAGE_ROWS,
) -> ReplayResult:
    """Spool is None for a dry run: count what would happen, write nothing. Rows are taken a page at a time, each
    page spooled and marked before the next is read: memory stays bounded however many rows match."""
    result = ReplayResult(reason, dry_run=spool is None)
    still: Counter[str] = Counter()
    for rows in _matching_pages(config, client, reason, (since, until), page_rows):
        result.matched += len(rows)
        waiting = [row for row in rows if not row["replayed"]]
        result.skipped += len(rows) - len(waiting)
        valid = _valid_readings(waiting, still, config.partition_window)
        if spool is None:
            result.replayed += len(valid)
            continue
        # A sink's dead letter is owed to that sink alone: the other one took the reading already.
        spooled = _spool_readings(spool, [reading for _, reading in valid], DEAD_LETTERS_OF.get(reason))
        _mark(config, client, [row for row, _ in valid[:spooled]])
        result.replayed += spooled
        if spooled < len(valid):
            result.still_rejected = dict(still)
            raise SpoolFullError(
                f"the spool is full after {result.replayed} readings; run replay again once it has drained"
            )
    result.still_rejected = dict(still)
    return result


def _valid_readings(
    rows: list[dict[str, Any]], still: Counter[str], window: PartitionWindow
) -> list[tuple[dict[str, Any], Reading]]:
    """Each row's raw payload validated again, as it arrived; what stays invalid is counted by its reason."""
    valid = []
    for row in rows:
        received_at = row["received_at"].astimezone(UTC)
        raw = row["payload"].encode("utf-8", "surrogatepass")
        outcome = validate(Inbound(row["mqtt_topic"], raw, received_at), window)
        if not isinstance(outcome, Reading):
            still[outcome.reason] += 1
        elif row["event_id"] and outcome.event_id != row["event_id"]:
            still[ORIGINAL_CHANGED] += 1
        else:
            valid.append((row, outcome))
    return valid


def _matching_pages(
    config: Config, client: Any, reason: str, window: tuple[datetime | None, datetime | None], page_rows: int
) -> Iterator[list[dict[str, Any]]]:
    since, until = window
    rejects = cloud.table_id(config, config.bigquery_rejects_table)
    where = ["r.reason = @reason"]
    params = [bigquery.ScalarQueryParameter("reason", "STRING", reason)]
    for name, moment, test in (("since", since, ">="), ("until", until, "<")):
        if moment is not None:
            where.append(f"r.received_at {test} @{name}")
            params.append(bigquery.ScalarQueryParameter(name, "TIMESTAMP", moment))
    sql = (
        f"SELECT r.reject_id, r.received_at, r.mqtt_topic, r.payload, r.event_id, "
        f"r.reject_id IN (SELECT reject_id FROM `{replayed_table(config)}`) AS replayed "
        f"FROM `{rejects}` AS r WHERE {' AND '.join(where)} "
        # insert_all may have written a reject twice: one row per reject_id, chosen by the query, not in memory
        f"QUALIFY ROW_NUMBER() OVER (PARTITION BY r.reject_id) = 1 ORDER BY r.received_at"
    )
    job = client.query(
        sql, job_config=bigquery.QueryJobConfig(query_parameters=params), location=config.bigquery_location
    )
    rows = job.result(timeout=config.setup_timeout_seconds * 12, page_size=page_rows)
    for page in rows.pages:
        yield [dict(row.items()) for row in page]


def _spool_readings(spool: Spool, readings: list[Reading], only_sinks: int | None) -> int:
    """How many went in, in order; stops at a full spool."""
    entries = [entry(READING, reading.site_code, reading_row(reading), only_sinks) for reading in readings]
    done = 0
    while done < len(entries):
        try:
            done += spool.append(entries[done:])
        except SpoolFullError:
            break
    return done


def _mark(config: Config, client: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    now = rfc3339(datetime.now(UTC))
    marks = [{"reject_id": row["reject_id"], "replayed_at": now, "event_id": row["event_id"]} for row in rows]
    for start in range(0, len(marks), MARKS_PER_REQUEST):
        chunk = marks[start : start + MARKS_PER_REQUEST]
        errors = client.insert_rows_json(replayed_table(config), chunk, row_ids=[mark["reject_id"] for mark in chunk])
        if errors:
            raise RuntimeError(f"readings spooled, but marking them as replayed failed: {json.dumps(errors)[:300]}")
