"""Which records a lost write stream had already landed, asked of the table itself.

When the service says a stream is gone (or behind the offsets the spool gave), the records that were in flight
on it may or may not be in the table: an append can land and its answer be lost with the stream. Sent on a new
stream unchecked, those would be second rows. Rows of a committed stream "are available for reading immediately
as you write them" (Storage Write API, committed type), so one query by the records' ids says which landed.

The query needs `bigquery.jobs.create` on the project (roles/bigquery.jobUser) beside the data editor's read of
the table. It filters on the table's partitioning column too, between the records' earliest and latest values,
so only their days are scanned ("Querying partitioned tables": a filter on the partitioning column prunes). A
lookup that fails raises: the records keep their old offsets and the question is asked again, never skipped.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from google.cloud import bigquery

from fmi_bridge.sinks.bigquery_insert_all import Destination
from fmi_bridge.spool import Record

# Keys per query: far below the query request's 1 MB parameter limit at 32-character ids.
KEYS_PER_QUERY = 5_000


class LandedRows:
    def __init__(
        self, client: Any, destination: Destination, schema_file: Path, *, location: str, timeout: float
    ) -> None:
        self.client = client  # google.cloud.bigquery.Client
        self.location = location  # the dataset's: a query job runs where its tables are
        self.table = destination.table
        self.key = destination.id_key  # the row's id, derived from the message: the same for every copy
        self.partition = json.loads(schema_file.read_text()).get("timePartitioning", {}).get("field")
        self.timeout = timeout

    def landed(self, records: list[Record]) -> list[int]:
        """The ids (spool record ids) of those records whose row the table already holds."""
        found: list[int] = []
        for start in range(0, len(records), KEYS_PER_QUERY):
            chunk = records[start : start + KEYS_PER_QUERY]
            by_key = {str(record.row[self.key]): record.id for record in chunk}
            found += [by_key[key] for key in self._present(chunk, list(by_key)) if key in by_key]
        return found

    def _present(self, records: list[Record], keys: list[str]) -> list[str]:
        sql = f"SELECT {self.key} AS key FROM `{self.table}` WHERE {self.key} IN UNNEST(@keys)"
        parameters: list[Any] = [bigquery.ArrayQueryParameter("keys", "STRING", keys)]
        values = [value for record in records if self.partition and (value := record.row.get(self.partition))]
        if values:
            sql += f" AND {self.partition} BETWEEN @earliest AND @latest"
            parameters += [
                bigquery.ScalarQueryParameter("earliest", "TIMESTAMP", min(values, key=_instant)),
                bigquery.ScalarQueryParameter("latest", "TIMESTAMP", max(values, key=_instant)),
            ]
        rows = self.client.query_and_wait(
            sql,
            job_config=bigquery.QueryJobConfig(query_parameters=parameters),
            location=self.location,
            api_timeout=self.timeout,
            wait_timeout=self.timeout,
        )
        return [str(row["key"]) for row in rows]


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)  # the rows' UTC timestamps, "…Z" (Python 3.11 reads the Z)
