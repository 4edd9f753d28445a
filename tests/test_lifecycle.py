"""Backpressure on a full spool, graceful shutdown, a corrupt spool at start, and what operators see."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Cloud, assert_delivered, start_bridge
from tests.sinks.pubsub_server import Faults
from tests.support import (
    Bridge,
    Broker,
    Published,
    listening_on,
    publish,
    readings,
    wait_until,
)

pytestmark = pytest.mark.slow

SITES = ["S1", "S2", "S3"]


def test_a_full_spool_holds_acks_turns_unready_and_resumes_by_itself(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    limit = 1024**2  # the smallest allowed: about 2,400 readings
    bridge = start_bridge(bridges, cloud, broker, SPOOL_MAX_BYTES=str(limit))
    faults.unavailable = True  # Pub/Sub down: the spool cannot drain
    messages = readings(SITES, 1200)

    publish(broker.port, messages)

    wait_until(lambda: bridge.status("/readiness_check")[0] == 503, 30, "readiness to turn 503")
    assert "spool full" in bridge.status("/readiness_check")[1]
    assert bridge.metric("fmi_bridge_backpressure") == 1
    assert bridge.metric("fmi_bridge_acks_withheld_total") > 0
    assert bridge.metric("fmi_bridge_spool_bytes") <= limit
    assert bridge.alive()
    assert any(e.get("message", "").startswith("spool cannot take messages") for e in bridge.log_entries())

    faults.unavailable = False

    assert_delivered(cloud, messages)
    wait_until(lambda: bridge.status("/readiness_check")[0] == 200, 30, "readiness back to 200")
    assert bridge.metric("fmi_bridge_backpressure") == 0


def test_sigterm_flushes_within_the_bound_and_exits_0(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker, SHUTDOWN_FLUSH_SECONDS="20")
    faults.latency_seconds = 0.2  # the sinks are slow, not down: the flush can finish
    messages = readings(SITES, 300)
    publish(broker.port, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") == len(messages), 30, "intake")

    started = time.monotonic()
    assert bridge.terminate() == 0
    assert time.monotonic() - started < 25

    stopped = [e for e in bridge.log_entries() if e.get("message") == "stopped"]
    assert stopped[-1]["records_kept_in_spool"] == 0
    assert_delivered(cloud, messages, timeout=10)


def test_sigterm_during_an_outage_keeps_the_rest_and_a_restart_sends_it(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker, SHUTDOWN_FLUSH_SECONDS="2")
    faults.unavailable = True
    messages = readings(SITES, 300)
    publish(broker.port, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") == len(messages), 30, "intake")

    started = time.monotonic()
    assert bridge.terminate() == 0
    assert time.monotonic() - started < 15  # the bound, not the outage, decides
    kept = [e for e in bridge.log_entries() if e.get("message") == "stopped"][-1]["records_kept_in_spool"]
    assert kept == len(messages)  # BigQuery took them all, Pub/Sub none: every record still owed to Pub/Sub

    faults.unavailable = False
    bridge.start()
    bridge.wait_ready()
    assert_delivered(cloud, messages)


def test_a_corrupt_spool_is_moved_aside_and_a_fresh_one_started(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    garbage = b"this is not an SQLite database" * 100
    (spool / "spool.db").write_bytes(garbage)

    bridge = start_bridge(bridges, cloud, broker)

    moved = list(spool.glob("spool.db.corrupt-*"))
    assert [path.read_bytes() for path in moved] == [garbage]  # kept, not deleted
    line = next(e for e in bridge.log_entries() if "moved aside" in e.get("message", ""))
    assert line["severity"] == "ERROR" and line["moved_to"] == str(moved[0])
    messages = readings(SITES, 20)
    publish(broker.port, messages)
    assert_delivered(cloud, messages)


def test_a_flood_of_bad_messages_is_counted_but_its_log_lines_are_rate_limited(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    flood = [Published("FCTS/FAE/S1/SolvExtract/T", b"garbage %d" % n) for n in range(3000)]

    publish(broker.port, flood)

    wait_until(lambda: bridge.metric("fmi_bridge_messages_rejected_total", 'reason="bad_json"') == 3000, 30, "count")
    lines = [e for e in bridge.log_entries() if e.get("message") == "message rejected"]
    assert 1 <= len(lines) <= 100
    assert bridge.metric("fmi_bridge_log_lines_suppressed_total") == 3000 - len(lines)


def test_metrics_cover_intake_spool_sinks_and_connection(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    messages = readings(SITES, 10)
    publish(broker.port, [*messages, Published("FCTS/FAE/S1/SolvExtract/T", b"{}")])
    assert_delivered(cloud, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "an empty spool")

    assert bridge.metric("fmi_bridge_messages_received_total") == 31
    assert bridge.metric("fmi_bridge_messages_accepted_total") == 30
    assert bridge.metric("fmi_bridge_messages_rejected_total", 'reason="missing_field"') == 1
    assert bridge.metric("fmi_bridge_sink_sent_total", 'sink="pubsub"') == 30
    assert bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"') == 31
    assert bridge.metric("fmi_bridge_sink_send_seconds_count", 'sink="pubsub"') >= 1
    assert bridge.metric("fmi_bridge_mqtt_connects_total") == 1
    assert bridge.status("/metrics")[0] == 404  # the port App Engine routes serves the checks only
    status, text = bridge.metrics_page()
    assert status == 200
    assert listening_on(bridge.metrics_port) == {"127.0.0.1"}  # unreachable from outside the instance
    for name in (
        "fmi_bridge_spool_bytes",
        "fmi_bridge_spool_oldest_record_age_seconds",
        "fmi_bridge_sink_retried_total",
        "fmi_bridge_sink_failed_total",
        "fmi_bridge_mqtt_disconnects_total",
        "fmi_bridge_acks_withheld_total",
    ):
        assert name in text
    assert bridge.status("/liveness_check") == (200, "ok\n")
