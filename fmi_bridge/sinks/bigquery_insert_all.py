"""BigQuery sink: one lane per destination table (readings, rejects), by streaming insert with insertId =
event_id / reject_id. Each lane has its own sender, so a table that keeps failing never holds up the other.

Rules:
- Whole-request faults (network, 5xx, timeouts, missing table or permission) leave the batch in the spool.
- Batches are bounded by rows and by bytes as sent, under insertAll's 10 MB request limit with room for the
  JSON around each row. A 400 for a whole request, or a 413 from the front end for a far-oversized one
  (googleapis/google-cloud-go#2855), is narrowed down by halving, not row by row.
- Per-row errors: a row BigQuery calls `invalid` is refused for good. A refused reading moves to the rejects
  table with the error (reason `bigquery_rejected`); a refused rejects-table row is logged in full at ERROR and
  let go (retrying could never succeed). Any other per-row reason (`backendError`, `timeout`, `stopped`, ...)
  is transient: the row stays in the spool and is sent again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry

from fmi_bridge.events import dead_letter_row
from fmi_bridge.sinks.contract import BIGQUERY, Sink, WriteResult, missing
from fmi_bridge.spool import READING, REJECT, Record, Spool

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "bigquery_rejected"
# insertAll takes at most 10 MB a request; each row travels as {"insertId": ..., "json": row} plus separators.
REQUEST_BYTES = 10_000_000
ROW_OVERHEAD_BYTES = 100
PERMANENT_ROW_REASONS = frozenset({"invalid"})


@dataclass(frozen=True)
class Destination:
    """A lane: the records of one kind and the table they go to."""

    kind: str
    table: str
    id_key: str

    @property
    def lane(self) -> str:
        return "readings" if self.kind == READING else "rejects"


def destinations(readings_table: str, rejects_table: str) -> tuple[Destination, Destination]:
    return Destination(READING, readings_table, "event_id"), Destination(REJECT, rejects_table, "reject_id")


class _TransientError(Exception):
    pass


class BigQuerySink(Sink):
    name = "bigquery"
    bit = BIGQUERY

    def __init__(self, client: Any, destination: Destination, *, batch_size: int, timeout: float) -> None:
        self.client = client
        self.destination = destination
        self.lane = f"{self.name}/{destination.lane}"
        self.batch_size = batch_size
        self.timeout = timeout
        # Our own retry loop lives in the sender; the client only smooths over short blips.
        self._retry = Retry(initial=0.2, maximum=2.0, timeout=min(timeout, 10.0))

    def next_batch(self, spool: Spool) -> list[Record]:
        records = spool.pending(
            self.bit,
            self.batch_size,
            kind=self.destination.kind,
            max_bytes=REQUEST_BYTES - self.batch_size * ROW_OVERHEAD_BYTES,
        )
        return _within_request(records)

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit, self.destination.kind)

    def write(self, records: list[Record]) -> WriteResult:
        result = WriteResult()
        try:
            refused = self._insert(records)
        except _TransientError as exc:
            return WriteResult(retry=[record.id for record in records], error=str(exc))
        for record in records:
            outcome = refused.get(record.id)
            if outcome is None:
                result.done.append(record.id)
            elif not outcome[0]:
                result.retry.append(record.id)
                result.error = f"BigQuery asked for a row to be sent again: {outcome[1]}"
            elif record.kind == READING:
                log.error(
                    "reading refused by BigQuery; moved to the rejects table",
                    extra={"event_id": record.row.get("event_id"), "detail": outcome[1]},
                )
                result.dead_letters.append((record.id, dead_letter_row(record.row, DEAD_LETTER_REASON, outcome[1])))
            else:
                log.error(
                    "rejects-table row refused by BigQuery; it is kept only in this log line",
                    extra={"row": record.row, "detail": outcome[1]},
                )
                result.done.append(record.id)
        return result

    def _insert(self, group: list[Record]) -> dict[int, tuple[bool, str]]:
        """Insert rows; return the refused ones {record id: (for good?, error)}. Raise _TransientError to retry
        the whole group later."""
        table, id_key = self.destination.table, self.destination.id_key
        rows = [record.row for record in group]
        try:
            errors = self.client.insert_rows_json(
                table,
                rows,
                row_ids=[row[id_key] for row in rows],
                skip_invalid_rows=True,
                retry=self._retry,
                timeout=self.timeout,
            )
        except api_exceptions.NotFound as exc:
            raise missing(f"BigQuery table {table}") from exc
        except api_exceptions.GoogleAPICallError as exc:
            if not (isinstance(exc, api_exceptions.BadRequest) or exc.code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                raise _TransientError(f"insert into {table} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
            if len(group) == 1:
                return {group[0].id: (True, f"{exc.code}: {exc.message}")}
            half = len(group) // 2
            return {**self._insert(group[:half]), **self._insert(group[half:])}
        except Exception as exc:  # network, 5xx, timeouts, 403: all worth another try later
            raise _TransientError(f"insert into {table} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
        return {group[entry["index"]].id: _classify(entry.get("errors", [])) for entry in errors}

    def close(self) -> None:
        self.client.close()


def _within_request(records: list[Record]) -> list[Record]:
    """The records whose rows fit one request as the client sends it: json.dumps' ASCII, where a character
    outside ASCII is a \\uXXXX escape (up to 3 times its UTF-8 bytes, which is what the spool counts)."""
    total = 0
    for count, record in enumerate(records):
        total += len(json.dumps(record.row)) + ROW_OVERHEAD_BYTES
        if count and total > REQUEST_BYTES:
            return records[:count]
    return records


def _classify(errors: list[dict[str, Any]]) -> tuple[bool, str]:
    """(refused for good?, the errors as text): for good only when BigQuery says the row itself is invalid."""
    text = "; ".join(f"{e.get('reason', 'error')}: {e.get('message', '')}" for e in errors) or "refused"
    return any(e.get("reason") in PERMANENT_ROW_REASONS for e in errors), text
