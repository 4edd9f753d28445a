"""The operator's commands against real parts: check-config reaching every endpoint, provision --subscription on
Google's emulator, and replay re-driving dead letters from the rejects table in bqemulator."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.cloud import bigquery as bq
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from fmi_bridge.cloud import emulator_transport
from fmi_bridge.commands.provision import table_resource
from fmi_bridge.commands.replay import replay
from fmi_bridge.config import Config
from fmi_bridge.events import dead_letter_row, reading_row
from fmi_bridge.readings import Inbound, Reading, validate
from fmi_bridge.sinks.contract import BIGQUERY, PUBSUB
from fmi_bridge.spool import READING, Spool, SpoolFullError, entry
from tests.conftest import PROJECT, Cloud, PubSubEndpoint, cloud_env, start_bridge
from tests.sinks.pubsub_server import Faults
from tests.support import (
    ROOT,
    BigQueryEmulator,
    Bridge,
    Broker,
    Published,
    bq_query,
    expected_ids,
    free_port,
    publish,
    reading,
    readings,
    wait_until,
)
from tests.test_config import run

_names = itertools.count(1)


def operator_env(pubsub: PubSubEndpoint, bigquery: BigQueryEmulator, broker_port: int) -> dict[str, str]:
    """An unprovisioned DEV environment on the emulators, with the broker at `broker_port`."""
    return {**cloud_env(pubsub, bigquery), "MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(broker_port)}


def test_check_config_reaches_every_configured_endpoint(
    broker: Broker, pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator
) -> None:
    env = {**operator_env(pubsub_endpoint, bigquery, broker.port), "BIGQUERY_STORAGE_EMULATOR_HOST": bigquery.grpc_host}
    result = run(env, "check-config")
    assert result.returncode == 0, result.stderr
    answered = json.loads(result.stdout)["endpoints"]
    assert sorted(name.split(" at ")[0] for name in answered) == [
        "BigQuery",
        "Pub/Sub",
        "the BigQuery Storage Write API",
        "the MQTT broker",
    ]
    assert all(outcome.startswith("answered in") for outcome in answered.values())


def test_check_config_names_each_endpoint_that_does_not_answer_and_its_variable(
    pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator
) -> None:
    dead_broker, dead_pubsub = free_port(), free_port()
    env = {
        **operator_env(pubsub_endpoint, bigquery, dead_broker),
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{dead_pubsub}",
        "SETUP_TIMEOUT_SECONDS": "2",
    }
    started = time.monotonic()
    result = run(env, "check-config")
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"the MQTT broker at 127.0.0.1:{dead_broker} (MQTT_BROKER, MQTT_PORT)" in line
    assert f"Pub/Sub at 127.0.0.1:{dead_pubsub} (PUBSUB_EMULATOR_HOST)" in line
    assert "BigQuery" not in line  # it answered
    assert run(env, "check-config", "--offline").returncode == 0  # validation alone reaches nothing


def test_provision_makes_an_ordered_subscription_that_a_consumer_pulls_readings_from(
    broker: Broker,
    pubsub_endpoint: PubSubEndpoint,
    bigquery: BigQueryEmulator,
    bridges: Callable[..., Bridge],
) -> None:
    env = operator_env(pubsub_endpoint, bigquery, broker.port)
    name = f"consumer-{next(_names)}"
    first = run(env, "provision", "--subscription", name)
    assert first.returncode == 0, first.stderr
    assert f"created subscription projects/{PROJECT}/subscriptions/{name} (ordered" in first.stdout
    again = run(env, "provision", "--subscription", name)
    assert again.returncode == 0 and f"subscription projects/{PROJECT}/subscriptions/{name} exists" in again.stdout

    bad = run(env, "provision", "--subscription", "9-starts-with-a-digit")
    assert bad.returncode == 2 and "subscription name" in bad.stderr

    subscriber = pubsub_v1.SubscriberClient(**emulator_transport(pubsub_endpoint.host, SubscriberGrpcTransport))
    plain = f"plain-{next(_names)}"
    topic = f"projects/{PROJECT}/topics/{env['PUBSUB_TOPIC']}"
    subscriber.create_subscription(request={"name": f"projects/{PROJECT}/subscriptions/{plain}", "topic": topic})
    clash = run(env, "provision", "--subscription", plain)
    assert clash.returncode == 1 and "message ordering off" in clash.stderr and plain in clash.stderr

    bridge = bridges({**env}).start()
    bridge.wait_ready()
    messages = readings(["S1", "S2"], 5)
    publish(broker.port, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_sink_sent_total", 'sink="pubsub"') == len(messages), 30, "sent")

    # What the README's walkthrough runs to see the readings: tools/peek.py, pull and query.
    pulled = [json.loads(line) for line in peek(env, "pubsub", name).stdout.splitlines()]
    assert {m["attributes"]["event_id"] for m in pulled} == expected_ids(messages)
    for site in ("S1", "S2"):
        values = [m["data"]["value"] for m in pulled if m["ordering_key"] == site]
        assert values == sorted(values) and len(values) == 5
    wait_until(lambda: bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"') == len(messages), 30, "BigQuery")
    sql = f"SELECT event_id, value FROM {env['BIGQUERY_DATASET']}.readings"
    rows = [json.loads(line) for line in peek(env, "bigquery", sql).stdout.splitlines()]
    assert {row["event_id"] for row in rows} == expected_ids(messages)
    subscriber.close()


def peek(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "peek.py"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_replay_re_drives_dead_letters_once_their_cause_is_fixed(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    faults.reject = lambda message: message.ordering_key == "S2"  # Pub/Sub refuses site S2 for good
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_DEADLETTER_ATTEMPTS="1")
    refused = readings(["S2"], 4)
    junk = [Published("FCTS/FAE/S1/SolvExtract/T", b"not json")]
    publish(broker.port, refused + junk)
    good: list[Published] = []

    def reasons() -> list[str]:
        return sorted(row["reason"] for row in bq_query(cloud.bq, f"SELECT reason FROM `{cloud.rejects_table}`"))

    def dead_lettered_while_s1_flows() -> bool:
        # The topic takes S1's readings meanwhile: the refusals are S2's own, not the topic's.
        good.append(reading("S1", len(good)))
        publish(broker.port, good[-1:])
        return reasons() == ["bad_json"] + ["pubsub_rejected"] * 4

    wait_until(dead_lettered_while_s1_flows, 90, "the dead letters", interval=0.3)
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "an empty spool")
    assert bridge.terminate() == 0
    faults.reject = None  # the cause is fixed
    env = {**bridge.env}

    def replay(*args: str) -> dict[str, Any]:
        result = run(env, "replay", *args)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    dry = replay("--reason", "pubsub_rejected", "--dry-run")
    assert (dry["matched"], dry["replayed"], dry["skipped"], dry["dry_run"]) == (4, 4, 0, True)
    done = replay("--reason", "pubsub_rejected")
    assert (done["matched"], done["replayed"], done["skipped"], done["still_rejected"]) == (4, 4, 0, {})
    again = replay("--reason", "pubsub_rejected")
    assert (again["replayed"], again["skipped"]) == (0, 4)
    still = replay("--reason", "bad_json")
    assert (still["replayed"], still["still_rejected"]) == (0, {"bad_json": 1})
    assert replay("--reason", "pubsub_rejected", "--since", "2999-01-01T00:00:00Z")["matched"] == 0

    bridge.start()
    bridge.wait_ready()
    assert cloud.reader.wait_for(len(good + refused), 60) == expected_ids(good + refused)  # same event_ids
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "the replayed readings sent")
    # Owed to Pub/Sub alone: BigQuery had them already and holds each once.
    rows = bq_query(cloud.bq, f"SELECT event_id FROM `{cloud.readings_table}`")
    assert sorted(row["event_id"] for row in rows) == sorted(expected_ids(good + refused))


def test_replay_refuses_while_a_bridge_owns_the_spool(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    result = run(bridge.env, "replay", "--reason", "pubsub_rejected")
    assert result.returncode == 1 and "in use by another process" in result.stderr


def test_replay_of_a_reason_the_bridge_never_writes_says_so(cloud: Cloud, tmp_path: Path) -> None:
    """A typo would otherwise answer "matched": 0, as if there were nothing to replay."""
    result = run({**cloud.env, "SPOOL_DIR": str(tmp_path / "spool")}, "replay", "--reason", "nosuchreason")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "nosuchreason: no such reason" in line and "bad_json" in line and "pubsub_rejected" in line
    assert not (tmp_path / "spool").exists()


def test_replay_without_its_marks_table_says_to_run_provision(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    """A dataset provisioned by an earlier version has no replay marks table yet."""
    cloud.bq.delete_table(f"{cloud.rejects_table}_replayed")
    result = run({**cloud.env, "SPOOL_DIR": str(bridges({}).workdir / "spool")}, "replay", "--reason", "bad_json")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "readings_rejected_replayed" in line and "`provision` creates what is missing" in line


def test_replay_goes_a_page_at_a_time_and_a_full_spool_stops_it_with_what_it_took_marked(
    cloud: Cloud, tmp_path: Path
) -> None:
    """Seven dead letters, pages of two, a spool with room for three: each run replays what fits, marks it and
    stops with a clear error; once the spool has drained the next run skips what is marked and goes on."""
    now = datetime.now(UTC)
    messages = readings(["S1"], 7)
    rows = []
    for message in messages:
        outcome = validate(Inbound(message.topic, message.payload, now))
        assert isinstance(outcome, Reading)
        rows.append(dead_letter_row(reading_row(outcome), "pubsub_rejected", "refused"))
    for _ in range(2):  # at least once: a reject may be in the table twice, and is replayed once
        assert cloud.bq.insert_rows_json(cloud.rejects_table, rows, row_ids=[None] * len(rows)) == []
    assert len(bq_query(cloud.bq, f"SELECT reject_id FROM `{cloud.rejects_table}`")) == 14
    size = entry(READING, "S1", rows[0]).size
    spool = Spool.open(tmp_path, max_bytes=size * 3 + size // 2, min_free_bytes=1, reading_bits=3, reject_bits=2)
    sent: list[str] = []

    def drain() -> None:  # what the bridge's Pub/Sub sender does
        records = spool.pending(PUBSUB, 10)
        sent.extend(record.row["event_id"] for record in records)
        spool.settle(PUBSUB, [record.id for record in records])

    for _ in range(2):
        with pytest.raises(SpoolFullError, match="after 3 readings"):
            replay(cloud.config, cloud.bq, spool, "pubsub_rejected", page_rows=2)
        assert spool.count_pending(PUBSUB) == 3 and spool.count_pending(BIGQUERY) == 0  # owed to Pub/Sub alone
        drain()
    result = replay(cloud.config, cloud.bq, spool, "pubsub_rejected", page_rows=2)
    assert (result.matched, result.skipped, result.replayed) == (7, 6, 1)
    drain()
    assert sorted(sent) == sorted(expected_ids(messages))  # each once
    assert len(bq_query(cloud.bq, f"SELECT reject_id FROM `{cloud.rejects_table}_replayed`")) == 7


def test_provision_puts_the_dataset_where_bigquery_location_says_and_names_a_mismatch(
    pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator, broker: Broker
) -> None:
    env = {**operator_env(pubsub_endpoint, bigquery, broker.port), "BIGQUERY_LOCATION": "europe-west1"}
    made = run(env, "provision")
    assert made.returncode == 0, made.stderr
    assert f"dataset {env['BIGQUERY_DATASET']} ready in europe-west1" in made.stdout
    assert bigquery.client().get_dataset(f"{PROJECT}.{env['BIGQUERY_DATASET']}").location == "europe-west1"

    elsewhere = run({**env, "BIGQUERY_LOCATION": "US"}, "provision")
    assert elsewhere.returncode == 1
    assert "is in europe-west1, but BIGQUERY_LOCATION=US" in elsewhere.stderr
    assert "cannot be changed" in elsewhere.stderr


def test_provision_adds_the_columns_a_release_brings_and_names_what_it_will_not_change(
    pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator, broker: Broker, bridges: Callable[..., Bridge]
) -> None:
    env = operator_env(pubsub_endpoint, bigquery, broker.port)
    config = Config.from_env(env)
    client = bigquery.client()
    client.create_dataset(f"{PROJECT}.{env['BIGQUERY_DATASET']}")
    older = table_resource(config, "readings", "bigquery_readings.json")
    older["schema"]["fields"] = [f for f in older["schema"]["fields"] if f["name"] != "payload"]  # a release ago
    client.create_table(bq.Table.from_api_repr(older))

    bridge = bridges(env).start()  # ahead of provision: says which table lacks which columns
    gap = wait_until(
        lambda: [e for e in bridge.log_entries() if e.get("message", "").startswith("table lacks columns")], 30, ""
    )
    assert gap[0]["severity"] == "ERROR" and gap[0]["columns"] == ["payload"] and "provision" in gap[0]["message"]
    bridge.stop()

    made = run(env, "provision")
    assert made.returncode == 0, made.stderr
    assert f"table {env['BIGQUERY_DATASET']}.readings: added column payload (STRING, NULLABLE)" in made.stdout
    table = client.get_table(f"{PROJECT}.{env['BIGQUERY_DATASET']}.readings")
    assert "payload" in [field.name for field in table.schema]
    again = run(env, "provision")  # safe to repeat: nothing more to add, no difference to name
    assert again.returncode == 0 and "added column" not in again.stdout

    bridge = bridges(env).start()
    bridge.wait_ready()
    assert not [e for e in bridge.log_entries() if e.get("message", "").startswith("table lacks columns")][1:]
    message = readings(["S1"], 1)
    publish(broker.port, message)
    wait_until(lambda: bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"') == 1, 30, "the row")
    rows = bq_query(client, f"SELECT payload FROM `{PROJECT}.{env['BIGQUERY_DATASET']}.readings`")
    assert [row["payload"] for row in rows] == [message[0].payload.decode()]  # the new column holds data

    retyped = {**env, "BIGQUERY_TABLE": "retyped"}
    wrong = table_resource(Config.from_env(retyped), "retyped", "bigquery_readings.json")
    for field in wrong["schema"]["fields"]:
        if field["name"] == "value":
            field["type"] = "STRING"
    client.create_table(bq.Table.from_api_repr(wrong))
    refused = run(retyped, "provision")
    assert refused.returncode == 1
    assert f"{env['BIGQUERY_DATASET']}.retyped.value is STRING, schemas/ says FLOAT" in refused.stderr
