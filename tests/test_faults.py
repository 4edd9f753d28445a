"""The fault matrix: each fault costs no reading, and per-site Pub/Sub order holds.

Each test publishes a few thousand readings across several sites through a real Mosquitto, injects one fault,
and checks that every reading reaches both sinks (distinct event_id) in publish order per site.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from google.cloud import bigquery as bq

from fmi_bridge.commands.provision import table_resource
from tests.conftest import PROJECT, Cloud, PubSubEndpoint, assert_delivered, make_cloud, start_bridge, write_layer
from tests.sinks.pubsub_server import Faults
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    bq_distinct_ids,
    bq_query,
    expected_ids,
    publish,
    reading,
    readings,
    site_sequences,
    wait_until,
)

pytestmark = pytest.mark.slow

SITES = ["S1", "S2", "S3", "S4"]
PER_SITE = 750  # 3,000 readings a test


def in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_subscriber_kill_9_mid_stream_loses_nothing(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    messages = readings(SITES, PER_SITE)
    publisher = in_background(lambda: publish(broker.port, messages))
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") > 500, 30, "the stream to be flowing")

    bridge.kill()
    publisher.join(60)
    bridge.start()

    assert_delivered(cloud, messages)


def test_broker_graceful_restart_mid_stream_loses_nothing(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    first, second = readings(SITES, PER_SITE // 2), readings(SITES, PER_SITE // 2, start=PER_SITE // 2)
    publish(broker.port, first[:200])
    assert bridge.process is not None
    bridge.process.send_signal(signal.SIGSTOP)  # the bridge stalls: the rest queues in the broker, in flight
    publish(broker.port, first[200:])

    broker.stop()
    broker.start()
    bridge.process.send_signal(signal.SIGCONT)
    bridge.wait_ready(60)
    publish(broker.port, second)

    assert_delivered(cloud, first + second)
    assert bridge.metric("fmi_bridge_mqtt_connects_total") >= 2


def test_pubsub_unavailable_for_a_while_then_back(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    # Rounds give up waiting after 2 s, so the outage outlasts several of them.
    bridge = start_bridge(bridges, cloud, broker, SINK_TIMEOUT_SECONDS="2")
    faults.unavailable = True
    messages = readings(SITES, PER_SITE)

    publish(broker.port, messages)
    # BigQuery keeps receiving while Pub/Sub is down.
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(messages), 60, "BigQuery rows")
    time.sleep(3)
    assert faults.refused_calls > 0
    assert cloud.reader.pull() == 0
    assert bridge.metric("fmi_bridge_spool_records") == len(messages)

    faults.unavailable = False

    assert_delivered(cloud, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "an empty spool")
    # The client's own retries landed them; the bridge took those late confirmations instead of sending again.
    cloud.reader.pull()
    assert len(cloud.reader.messages) == len(messages)


@pytest.fixture
def own_bigquery(tmp_path: Path) -> Iterator[BigQueryEmulator]:
    """A persistent emulator of this test's own, so it can be stopped and started again with its tables."""
    emulator = BigQueryEmulator(tmp_path, PROJECT, persistent=True).start()
    yield emulator
    emulator.stop()
    write_layer(emulator).stop()


def test_bigquery_down_for_a_while_then_back(
    broker: Broker, pubsub_endpoint: PubSubEndpoint, own_bigquery: BigQueryEmulator, bridges: Callable[..., Bridge]
) -> None:
    cloud = make_cloud(pubsub_endpoint, own_bigquery)
    bridge = start_bridge(bridges, cloud, broker, SINK_TIMEOUT_SECONDS="5")
    own_bigquery.stop()
    messages = readings(SITES, PER_SITE)

    publish(broker.port, messages)
    # Pub/Sub keeps receiving while BigQuery is down.
    assert cloud.reader.wait_for(len(messages), 60) == expected_ids(messages)
    wait_until(lambda: bridge.metric("fmi_bridge_sink_failed_total", 'sink="bigquery"') >= 2, 30, "failed inserts")
    assert bridge.metric("fmi_bridge_spool_records") == len(messages)

    own_bigquery.start()

    assert_delivered(cloud, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "an empty spool")
    counted = bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"]
    assert counted == len(messages)  # rows counted, not distinct ids: the emulator's restart wrote none twice
    cloud.reader.close()


def test_permanent_pubsub_error_on_one_key_dead_letters_only_the_poison(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    """Documented rule: a batch refused with INVALID_ARGUMENT is sent again one record at a time; a record
    refused alone PUBSUB_DEADLETTER_ATTEMPTS times goes to the rejects table; the site then carries on."""
    faults.reject = lambda message: message.ordering_key == "S2" and b'"sensor_id":"POISON"' in message.data
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_DEADLETTER_ATTEMPTS="2")
    messages = readings(SITES, PER_SITE)
    poison = reading("S2", PER_SITE // 2, sensor="POISON")
    messages[messages.index(reading("S2", PER_SITE // 2))] = poison

    publish(broker.port, messages)

    good = [message for message in messages if message != poison]
    assert cloud.reader.wait_for(len(good), 90) == expected_ids(good)
    sequences = site_sequences(cloud.reader.events())
    assert sequences["S2"] == [seq for seq in range(PER_SITE) if seq != PER_SITE // 2]
    for site in ("S1", "S3", "S4"):
        assert sequences[site] == list(range(PER_SITE))
    # BigQuery took the poison reading as any other; the rejects table says Pub/Sub refused it.
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(messages), 60, "BQ rows")
    rejects = wait_until(lambda: bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`"), 30, "the dead letter")
    assert [(row["reason"], row["event_id"]) for row in rejects] == [("pubsub_rejected", *expected_ids([poison]))]
    assert "refused" in rejects[0]["detail"]
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="pubsub"') == 1


def test_bigquery_row_errors_go_to_the_rejects_table_and_the_rest_is_inserted(
    broker: Broker, pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator, bridges: Callable[..., Bridge]
) -> None:
    cloud = make_cloud(pubsub_endpoint, bigquery)
    # Schema drift: the table wants an INT64 sensor_id, so readings from sensor "s1" are refused row by row.
    strict = table_resource(cloud.config, "strict", "bigquery_readings.json")
    for field in strict["schema"]["fields"]:
        if field["name"] == "sensor_id":
            field["type"] = "INT64"
    cloud.bq.create_table(bq.Table.from_api_repr(strict))
    table = f"{PROJECT}.{cloud.config.bigquery_dataset}.strict"
    bridge = start_bridge(
        bridges,
        cloud,
        broker,
        BIGQUERY_TABLE="strict",
        BIGQUERY_REJECTS_TABLE="readings_rejected",
        BIGQUERY_WRITE_METHOD="insert_all",  # type errors per row are insertAll's; the Write API's have their test
    )
    numeric = [reading(site, seq, sensor=str(1000 + seq)) for seq in range(300) for site in SITES]
    named = [reading(site, seq, sensor="s1") for seq in range(300, 320) for site in SITES]

    publish(broker.port, numeric + named)

    wait_until(lambda: bq_distinct_ids(cloud.bq, table) == expected_ids(numeric), 60, "the numeric rows")
    rejects = wait_until(
        lambda: (
            (rows := bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`")) and len(rows) >= len(named) and rows
        ),
        60,
        "the refused rows",
    )
    assert {row["event_id"] for row in rejects} == expected_ids(named)
    assert {row["reason"] for row in rejects} == {"bigquery_rejected"}
    assert all(row["detail"] for row in rejects)
    assert cloud.reader.wait_for(len(numeric + named), 30) == expected_ids(numeric + named)
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "nothing left to retry")
    cloud.reader.close()


def test_broker_unreachable_at_start(tmp_path: Path, cloud: Cloud, bridges: Callable[..., Bridge]) -> None:
    broker = Broker(tmp_path / "late-broker")
    bridge = bridges({**cloud.env, "MQTT_PORT": str(broker.port)}).start()
    wait_until(lambda: bridge.status("/liveness_check")[0] == 200, 20, "liveness")

    def retries() -> list[dict[str, Any]]:
        return [e for e in bridge.log_entries() if e.get("message") == "broker unreachable; trying again"]

    # A restart's worth of absence is said at INFO; a broker still away after 5 s is a WARNING.
    wait_until(lambda: retries() and retries()[-1]["severity"] == "WARNING", 30, "a WARNING once it stays away")
    status, body = bridge.status("/readiness_check")
    assert status == 503 and "not connected" in body
    assert len(retries()) >= 2 and retries()[0]["severity"] == "INFO"
    first, warned = (datetime.fromisoformat(e["time"]) for e in (retries()[0], retries()[-1]))
    assert (warned - first).total_seconds() >= 5
    delays = [e["retry_in_seconds"] for e in retries()]
    steps = [min(60.0, 2.0**attempt) for attempt in range(len(delays))]  # 1 s doubling to 60 s
    assert all(step / 2 - 0.01 <= delay <= step + 0.01 for delay, step in zip(delays, steps, strict=True))
    assert any(delay < step * 0.98 for delay, step in zip(delays, steps, strict=True))  # jittered below the step

    broker.start()
    try:
        bridge.wait_ready(90)
        messages = readings(SITES, 50)
        publish(broker.port, messages)
        assert cloud.reader.wait_for(len(messages), 30) == expected_ids(messages)
    finally:
        broker.kill()
