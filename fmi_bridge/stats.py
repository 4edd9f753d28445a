"""The outage budget, in numbers: what each sink still owes, how old its oldest record is, and how long the spool
lasts at the current intake rate. Every STATS_LOG_SECONDS one JSON line `stats` (App Engine flexible does not
scrape /metrics, but Cloud Logging can chart and alert on log fields); a WARNING when a sink's oldest owed record
is older than SINK_LAG_WARN_SECONDS.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from fmi_bridge.metrics import Metrics
from fmi_bridge.spool import Spool

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 5.0
RATE_WINDOW_SECONDS = 60.0


SITE_LINES = 50  # per interval, the busiest sites each get a line; the rest are summed as OTHER_SITES
OTHER_SITES = "(other sites)"
INTERVAL_COUNTS = "counts in interval"  # the message of the per-label lines that follow each stats line


class StatsReporter:
    def __init__(
        self,
        spool: Spool,
        metrics: Metrics,
        sinks: dict[str, int],
        *,
        interval: float,
        lag_warn_seconds: float,
        site_counts: Callable[[], Counter[str]] = Counter,
    ) -> None:
        self.spool = spool
        self.site_counts = site_counts
        self.metrics = metrics
        self.sinks = sinks  # sink name -> its spool bit
        self.interval = interval
        self.lag_warn_seconds = lag_warn_seconds
        self.heartbeat = time.monotonic()
        self._samples: deque[tuple[float, float]] = deque()  # (monotonic time, bytes spooled so far)
        self._lagging: set[str] = set()
        self._backlog: tuple[float, int] | None = None  # (since, peak records) while a backlog lasts
        self._last_counts = {"received": 0, "accepted": 0, "rejected": 0}  # at the previous stats line
        self._last_labelled: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def run(self, stop: threading.Event) -> None:
        next_line = time.monotonic() + self.interval
        while not stop.wait(min(SAMPLE_SECONDS, self.interval)):
            self.heartbeat = time.monotonic()
            self._sample()
            self._warn_on_lag()
            self._note_backlog()
            if time.monotonic() >= next_line:
                log.info("stats", extra=self.summary())
                for fields in self.interval_counts():
                    log.info(INTERVAL_COUNTS, extra=fields)
                next_line += self.interval
        self.heartbeat = time.monotonic()

    def _sample(self) -> None:
        now = time.monotonic()
        self._samples.append((now, self.metrics.total("fmi_bridge_spooled_bytes_total")))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()

    def intake_bytes_per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def seconds_to_full(self) -> float | None:
        """At the current intake rate, with nothing delivered meanwhile (a sink down): when SPOOL_MAX_BYTES is
        reached. None while nothing comes in."""
        rate = self.intake_bytes_per_second()
        if rate <= 0:
            return None
        return max(0.0, (self.spool.max_bytes - self.spool.stats().bytes) / rate)

    def _warn_on_lag(self) -> None:
        for name, bit in self.sinks.items():
            owed = self.spool.owed(bit)
            lagging = owed.oldest_age_seconds > self.lag_warn_seconds
            if lagging and name not in self._lagging:
                left = self.seconds_to_full()
                log.warning(
                    "sink is falling behind: its oldest record waits longer than SINK_LAG_WARN_SECONDS",
                    extra={
                        "sink": name,
                        # Up, to a tenth: a figure rounded down to the threshold would contradict "longer than".
                        "oldest_age_seconds": math.ceil(owed.oldest_age_seconds * 10) / 10,
                        "owed_records": owed.records,
                        "owed_bytes": owed.bytes,
                        "spool_seconds_to_full": None if left is None else round(left),
                    },
                )
            if not lagging and name in self._lagging:
                log.info("sink caught up", extra={"sink": name, "owed_records": owed.records})
            self._lagging = (self._lagging | {name}) if lagging else (self._lagging - {name})

    def _note_backlog(self) -> None:
        """One INFO line when the spool has drained after a backlog, with how long it lasted and its peak."""
        oldest = max((self.spool.owed(bit).oldest_age_seconds for bit in self.sinks.values()), default=0.0)
        records = self.spool.stats().records
        if oldest > self.lag_warn_seconds:  # the backlog the lag warning announced
            since, peak = self._backlog or (time.monotonic() - oldest, 0)
            self._backlog = (since, max(peak, records))
        elif self._backlog is not None and oldest < SAMPLE_SECONDS:
            since, peak = self._backlog
            log.info(
                "spool drained after a backlog",
                extra={"backlog_seconds": round(time.monotonic() - since), "peak_records": peak},
            )
            self._backlog = None

    def summary(self) -> dict[str, Any]:
        """The fields of the `stats` line; deploy/ alerting reads them by these names."""
        metrics, stats = self.metrics, self.spool.stats()
        left = self.seconds_to_full()
        owed = {name: self.spool.owed(bit) for name, bit in self.sinks.items()}
        counts = {
            "received": int(metrics.total("fmi_bridge_messages_received_total")),
            "accepted": int(metrics.total("fmi_bridge_messages_accepted_total")),
            "rejected": int(metrics.total("fmi_bridge_messages_rejected_total")),
        }
        # Per line as well as since start: a log-based metric can alert on a rate only from per-line values.
        since_last = {f"{name}_in_interval": counts[name] - self._last_counts[name] for name in counts}
        self._last_counts = counts
        return {
            "received": counts["received"],
            "accepted": counts["accepted"],
            "rejected": counts["rejected"],
            **since_last,
            "sent": {name: int(metrics.total("fmi_bridge_sink_sent_total", sink=name)) for name in self.sinks},
            "owed_records": {name: o.records for name, o in owed.items()},
            "owed_bytes": {name: o.bytes for name, o in owed.items()},
            "oldest_owed_age_seconds": {name: round(o.oldest_age_seconds, 1) for name, o in owed.items()},
            "spool_records": stats.records,
            "spool_oldest_age_seconds": round(stats.oldest_age_seconds, 1),
            "spool_bytes": stats.bytes,
            "spool_max_bytes": self.spool.max_bytes,
            "spool_seconds_to_full": None if left is None else round(left),
        }

    def interval_counts(self) -> list[dict[str, Any]]:
        """One line's fields per label value with a count since the previous stats line: rejects by reason,
        failed sends by lane and code, readings by site. Log-based metrics chart them by label (one series per
        reason, lane and code, site); the labels are bounded: reasons and codes are fixed sets, lanes are the
        configuration's, and only the SITE_LINES busiest sites of an interval get a line of their own."""
        lines = [
            {"counts": "rejects", "reason": labels["reason"], "count": count}
            for labels, count in self._deltas("fmi_bridge_messages_rejected_total", ("reason",))
        ]
        lines += [
            {"counts": "sink failures", "lane": labels["lane"], "code": labels["code"], "count": count}
            for labels, count in self._deltas("fmi_bridge_lane_failed_total", ("lane", "code"))
        ]
        sites = self.site_counts().most_common()
        lines += [{"counts": "site readings", "site": site, "count": count} for site, count in sites[:SITE_LINES]]
        if rest := sum(count for _, count in sites[SITE_LINES:]):
            lines.append({"counts": "site readings", "site": OTHER_SITES, "count": rest})
        return lines

    def _deltas(self, name: str, label_names: tuple[str, ...]) -> list[tuple[dict[str, str], int]]:
        """(labels, increase since the last call) of a labelled counter, for the label sets that grew."""
        grown = []
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name != name:
                    continue
                key = (name, tuple((label, sample.labels[label]) for label in label_names))
                increase = sample.value - self._last_labelled.get(key, 0.0)
                self._last_labelled[key] = sample.value
                if increase > 0:
                    grown.append((dict(key[1]), int(increase)))
        return grown
