"""Prometheus metrics of one bridge process, on a registry of its own (served at /metrics)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fmi_bridge.spool import SpoolStats

_SEND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SpoolCollector(Collector):
    """Reads the spool's figures at scrape time, so they are never stale."""

    def __init__(self, stats: Callable[[], SpoolStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        yield GaugeMetricFamily("fmi_bridge_spool_records", "Records in the spool", value=stats.records)
        yield GaugeMetricFamily("fmi_bridge_spool_bytes", "Record bytes in the spool", value=stats.bytes)
        yield GaugeMetricFamily(
            "fmi_bridge_spool_oldest_record_age_seconds",
            "Age of the oldest record still in the spool",
            value=stats.oldest_age_seconds,
        )


class _OwedCollector(Collector):
    """Per sink, what it still owes, read at scrape time; and the spool's time to full at the intake rate."""

    def __init__(self, owed: Callable[[], dict[str, Any]], seconds_to_full: Callable[[], float | None]) -> None:
        self._owed = owed
        self._seconds_to_full = seconds_to_full

    def collect(self) -> Iterator[GaugeMetricFamily]:
        owed = self._owed()
        families = (
            ("fmi_bridge_sink_owed_records", "Records a sink still owes", "records"),
            ("fmi_bridge_sink_owed_bytes", "Record bytes a sink still owes", "bytes"),
            ("fmi_bridge_sink_oldest_owed_age_seconds", "Age of the oldest record a sink owes", "oldest_age_seconds"),
        )
        for name, text, attribute in families:
            family = GaugeMetricFamily(name, text, labels=["sink"])
            for sink, figures in owed.items():
                family.add_metric([sink], getattr(figures, attribute))
            yield family
        left = self._seconds_to_full()
        yield GaugeMetricFamily(
            "fmi_bridge_spool_seconds_to_full",
            "Seconds until SPOOL_MAX_BYTES at the last minute's intake rate, nothing delivered meanwhile (+Inf: idle)",
            value=math.inf if left is None else left,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("fmi_bridge_messages_received", "MQTT messages received", registry=r)
        self.accepted = Counter("fmi_bridge_messages_accepted", "Valid readings spooled", registry=r)
        self.spooled_bytes = Counter("fmi_bridge_spooled_bytes", "Record bytes committed to the spool", registry=r)
        self.lane_failed = Counter(
            "fmi_bridge_lane_failed",
            "Send attempts that failed, by lane (sink/table) and status code (gRPC code name, SPOOL, ERROR)",
            ["lane", "code"],
            registry=r,
        )
        self.rejected = Counter("fmi_bridge_messages_rejected", "Messages rejected, by reason", ["reason"], registry=r)
        self.sent = Counter("fmi_bridge_sink_sent", "Records a sink confirmed", ["sink"], registry=r)
        self.failed = Counter("fmi_bridge_sink_failed", "Send attempts that failed", ["sink"], registry=r)
        self.settle_failed = Counter(
            "fmi_bridge_settle_failed",
            "Confirmed records the spool could not record yet (e.g. disk full); kept, not sent again",
            ["sink"],
            registry=r,
        )
        self.retried = Counter(
            "fmi_bridge_sink_retried", "Records left in the spool to send again", ["sink"], registry=r
        )
        self.dead_lettered = Counter(
            "fmi_bridge_sink_dead_lettered",
            "Records a sink refused for good, moved to the rejects table",
            ["sink"],
            registry=r,
        )
        self.send_seconds = Histogram(
            "fmi_bridge_sink_send_seconds", "Time of one send to a sink", ["sink"], buckets=_SEND_BUCKETS, registry=r
        )
        self.connects = Counter("fmi_bridge_mqtt_connects", "Successful MQTT connections", registry=r)
        self.retained = Counter(
            "fmi_bridge_mqtt_retained", "Retained messages the broker sent (only on a new subscription)", registry=r
        )
        self.disconnects = Counter("fmi_bridge_mqtt_disconnects", "MQTT connections lost or closed", registry=r)
        self.qos0_dropped = Counter(
            "fmi_bridge_mqtt_qos0_dropped",
            "QoS 0 messages dropped because the inbox was at its bound (at most once by contract)",
            registry=r,
        )
        self.acks_withheld = Counter(
            "fmi_bridge_acks_withheld", "Messages left un-acknowledged because the spool had no room", registry=r
        )
        self.backpressure = Gauge("fmi_bridge_backpressure", "1 while the spool has no room", registry=r)
        self.logs_suppressed = Counter(
            "fmi_bridge_log_lines_suppressed", "Log lines dropped by rate limiting", registry=r
        )

    def total(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples with these labels (all of them when none are given)."""
        return sum(
            sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def watch_owed(self, owed: Callable[[], dict[str, Any]], seconds_to_full: Callable[[], float | None]) -> None:
        self.registry.register(_OwedCollector(owed, seconds_to_full))

    def watch_inbox(self, depth: Callable[[], int]) -> None:
        Gauge(
            "fmi_bridge_inbox_messages",
            "Messages read from the broker, waiting for the intake (bounded; at the bound the link stops reading)",
            registry=self.registry,
        ).set_function(depth)

    def watch_count(self, name: str, text: str, count: Callable[[], float]) -> None:
        """A figure another module keeps (read at scrape time)."""
        Gauge(name, text, registry=self.registry).set_function(count)

    def watch_spool(self, stats: Callable[[], SpoolStats]) -> None:
        self.registry.register(_SpoolCollector(stats))
