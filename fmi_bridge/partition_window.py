"""The window of reading times BigQuery takes into the readings table, which is partitioned by `timestamp`.

Streaming into a time-unit column partitioned table (insertAll and the Storage Write API alike) is refused for a
row whose partition lies outside a window around the current date: "Streaming into partitioned tables",
https://cloud.google.com/bigquery/docs/streaming-data-into-bigquery. The page gives no fixed number, and the
window has changed over the years; the service's refusal names it. The current one, in its own words (seen in
January 2025, mozilla/gcp-ingestion#2721): "You can only stream to partitions of date range within 1825 days
in the past and 366 days in the future relative to the current date." Earlier refusals said 31/16, 365/183,
and Google has widened it for single projects on request (m-lab/etl-gardener#224): hence two settings.

A reading outside the window is a reject at intake (reason `timestamp_out_of_window`), so it reaches neither
sink rather than Pub/Sub alone, and it is kept in the rejects table, partitioned by arrival, for audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache

DAYS_PAST = 1825
DAYS_FUTURE = 366


@dataclass(frozen=True)
class PartitionWindow:
    days_past: int = DAYS_PAST
    days_future: int = DAYS_FUTURE

    def refuses(self, timestamp: datetime, received_at: datetime) -> str | None:
        """Why BigQuery would refuse a reading of `timestamp` streamed at `received_at`, or None. Dates are
        compared in UTC, as partitions are; a reading on the window's last day is taken."""
        day, today = timestamp.date(), received_at.date()
        first, last = _bounds(today, self.days_past, self.days_future)
        if first <= day <= last:
            return None
        return (
            f"timestamp {timestamp.isoformat()} falls outside the days BigQuery's partitioned table takes when it "
            f"arrives on {today.isoformat()}: {self.days_past} days back to {self.days_future} ahead "
            "(BIGQUERY_PARTITION_DAYS_PAST, BIGQUERY_PARTITION_DAYS_FUTURE)"
        )


@lru_cache(maxsize=16)  # the same day's bounds for every reading of that day: two date shifts a reading saved
def _bounds(today: date, days_past: int, days_future: int) -> tuple[date, date]:
    return _shift(today, -days_past), _shift(today, days_future)


def _shift(day: date, days: int) -> date:
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return date.min if days < 0 else date.max
