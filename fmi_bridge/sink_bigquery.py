"""BigQuery sink: readings and rejects by streaming insert, insertId = event_id / reject_id.

Rules:
- Whole-request faults (network, 5xx, timeouts, missing table or permission) leave the batch in the spool.
- Per-row errors: the row that BigQuery refused is moved to the rejects table with the error
  (reason `bigquery_rejected`); the other rows are inserted. A rejects-table row that is itself refused is
  logged in full at ERROR and let go: retrying it could never succeed.
- A 400 for a whole request is narrowed down by inserting its rows one at a time.
"""

from __future__ import annotations

import logging
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry

from fmi_bridge.events import dead_letter_row
from fmi_bridge.sinks import BIGQUERY, WriteResult
from fmi_bridge.spool import READING, Record, Spool

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "bigquery_rejected"


class _TransientError(Exception):
    pass


class BigQuerySink:
    name = "bigquery"
    bit = BIGQUERY

    def __init__(
        self, client: Any, readings_table: str, rejects_table: str, *, batch_size: int, timeout: float
    ) -> None:
        self.client = client
        self.readings_table = readings_table
        self.rejects_table = rejects_table
        self.batch_size = batch_size
        self.timeout = timeout
        # Our own retry loop lives in the sender; the client only smooths over short blips.
        self._retry = Retry(initial=0.2, maximum=2.0, timeout=min(timeout, 10.0))

    def confirmed_late(self) -> list[int]:
        return []  # inserts are synchronous: every outcome is known within its round

    def next_batch(self, spool: Spool) -> list[Record]:
        return spool.pending(self.bit, self.batch_size)

    def write(self, records: list[Record]) -> WriteResult:
        result = WriteResult()
        readings = [record for record in records if record.kind == READING]
        rejects = [record for record in records if record.kind != READING]
        for table, group, id_key in (
            (self.readings_table, readings, "event_id"),
            (self.rejects_table, rejects, "reject_id"),
        ):
            if not group:
                continue
            try:
                refused = self._insert(table, group, id_key)
            except _TransientError as exc:
                result.retry.extend(record.id for record in group)
                result.error = str(exc)
                continue
            for record in group:
                error = refused.get(record.id)
                if error is None:
                    result.done.append(record.id)
                elif record.kind == READING:
                    log.error(
                        "reading refused by BigQuery; moved to the rejects table",
                        extra={"event_id": record.row.get("event_id"), "detail": error},
                    )
                    result.dead_letters.append((record.id, dead_letter_row(record.row, DEAD_LETTER_REASON, error)))
                else:
                    log.error(
                        "rejects-table row refused by BigQuery; it is kept only in this log line",
                        extra={"row": record.row, "detail": error},
                    )
                    result.done.append(record.id)
        return result

    def _insert(self, table: str, group: list[Record], id_key: str) -> dict[int, str]:
        """Insert rows; return the refused ones {record id: error}. Raise _TransientError to retry all later."""
        try:
            errors = self.client.insert_rows_json(
                table,
                [record.row for record in group],
                row_ids=[record.row[id_key] for record in group],
                skip_invalid_rows=True,
                retry=self._retry,
                timeout=self.timeout,
            )
        except api_exceptions.BadRequest as exc:
            if len(group) == 1:
                return {group[0].id: f"{exc.code}: {exc.message}"}
            refused: dict[int, str] = {}
            for record in group:
                refused.update(self._insert(table, [record], id_key))
            return refused
        except Exception as exc:  # network, 5xx, timeouts, 403/404: all worth another try later
            raise _TransientError(f"insert into {table} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
        return {group[entry["index"]].id: _describe(entry.get("errors", [])) for entry in errors}

    def close(self) -> None:
        self.client.close()


def _describe(errors: list[dict[str, Any]]) -> str:
    return "; ".join(f"{e.get('reason', 'error')}: {e.get('message', '')}" for e in errors) or "refused"
