"""Readings published to a real Mosquitto land in Pub/Sub and BigQuery with the right fields and order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import jsonschema

from fmi_bridge.cloud import publisher_client
from fmi_bridge.config import Config
from tests.conftest import PROJECT, Cloud, PubSubEndpoint, start_bridge
from tests.support import (
    ROOT,
    BigQueryEmulator,
    Bridge,
    Broker,
    bq_distinct_ids,
    bq_query,
    expected_ids,
    free_port,
    listening_on,
    mosquitto_pub,
    publish,
    readings,
    site_sequences,
    wait_until,
)

SITES = ["S01", "S02", "S03", "S04"]


def test_readings_of_several_sites_reach_both_sinks_in_site_order(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    start_bridge(bridges, cloud, broker)
    messages = readings(SITES, per_site=250)

    publish(broker.port, messages)

    wanted = expected_ids(messages)
    assert cloud.reader.wait_for(len(wanted), timeout=60) == wanted
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == wanted, 60, "all rows in BigQuery")
    order = site_sequences(cloud.reader.events())
    assert order == {site: list(range(250)) for site in SITES}
    ordering_keys = {message.ordering_key for message in cloud.reader.messages}
    assert ordering_keys == set(SITES)


def test_event_fields_in_pubsub_and_bigquery(broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]) -> None:
    start_bridge(bridges, cloud, broker)
    payload = (
        '{"site_code": "MOR", "sensor_id": "FT-101", "timestamp": "2026-11-20T08:15:30.5-07:00", '
        '"value": 42.25, "unit": "m3/h"}'
    )

    assert mosquitto_pub(broker.port, "FCTS/FAE/MOR/SolvExtract/PI.FT101.PV", payload).returncode == 0

    cloud.reader.wait_for(1, timeout=30)
    message = cloud.reader.messages[0]
    event = json.loads(message.data)
    assert event["site_code"] == "MOR"
    assert event["pi_tag"] == "PI.FT101.PV"
    assert event["sensor_id"] == "FT-101"
    assert event["value"] == 42.25
    assert event["timestamp"] == "2026-11-20T15:15:30.500000Z"  # normalised to UTC
    assert event["mqtt_topic"] == "FCTS/FAE/MOR/SolvExtract/PI.FT101.PV"
    assert event["received_at"].endswith("Z")
    schema = json.loads((ROOT / "schemas" / "kpi_event.schema.json").read_text())
    jsonschema.validate(event, schema, format_checker=jsonschema.FormatChecker())
    assert message.ordering_key == "MOR"
    # A topic with a schema: Pub/Sub adds googclient_schemaname, _schemaencoding and _schemarevisionid itself.
    ours = {key: value for key, value in message.attributes.items() if not key.startswith("googclient_")}
    assert ours == {"site_code": "MOR", "pi_tag": "PI.FT101.PV", "event_id": event["event_id"]}

    rows = wait_until(lambda: bq_query(cloud.bq, f"SELECT * FROM `{cloud.readings_table}`"), 30, "the BigQuery row")
    row = dict(rows[0].items())
    assert row["event_id"] == event["event_id"]
    assert row["value"] == 42.25
    assert row["timestamp"].isoformat() == "2026-11-20T15:15:30.500000+00:00"
    assert json.loads(row["payload"])["unit"] == "m3/h"  # extra fields kept in the raw payload


def test_provision_twice_is_harmless_and_builds_the_tables_from_the_schemas(
    pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator
) -> None:
    env = {
        **os.environ,
        "APP_ENV": "DEV",
        "GCP_PROJECT_ID": PROJECT,
        "PUBSUB_TOPIC": "provisioned",
        "BIGQUERY_DATASET": "provisioned",
        "BIGQUERY_TABLE": "readings",
        "PUBSUB_EMULATOR_HOST": pubsub_endpoint.host,
        "BIGQUERY_EMULATOR_HOST": bigquery.url,
    }
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(ROOT / "mqtt_subscriber.py"), "provision"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    client = bigquery.client()
    readings_table = client.get_table(f"{PROJECT}.provisioned.readings")
    expected = json.loads((ROOT / "schemas" / "bigquery_readings.json").read_text())
    assert [field.name for field in readings_table.schema] == [f["name"] for f in expected["schema"]["fields"]]
    assert readings_table.time_partitioning.field == "timestamp"
    assert readings_table.clustering_fields == ["site_code", "pi_tag"]
    rejects_table = client.get_table(f"{PROJECT}.provisioned.readings_rejected")
    assert {"reason", "detail", "payload", "mqtt_topic", "received_at"} <= {f.name for f in rejects_table.schema}
    # insert_all writes at least once: the view gives data engineers one row per event_id.
    row = {"event_id": "e1", "site_code": "S", "pi_tag": "T", "sensor_id": "s", "value": 1.0, "mqtt_topic": "t",
           "payload": "{}", "timestamp": "2026-11-20T08:00:00Z"}  # fmt: skip
    first, again = {**row, "received_at": "2026-11-20T08:00:01Z"}, {**row, "received_at": "2026-11-20T08:00:09Z"}
    assert client.insert_rows_json(f"{PROJECT}.provisioned.readings", [first, again]) == []
    latest = bq_query(client, f"SELECT event_id, received_at FROM `{PROJECT}.provisioned.readings_latest`")
    assert [(r["event_id"], r["received_at"].second) for r in latest] == [("e1", 1)]
    publisher = publisher_client(Config.from_env(env))
    assert publisher.get_topic(topic=f"projects/{PROJECT}/topics/provisioned").name.endswith("/provisioned")


def test_cloud_environments_listen_on_every_interface(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)  # APP_ENV=DEV: App Engine's probes come from outside
    assert listening_on(bridge.port) == {"0.0.0.0"}


def test_a_list_of_filters_shards_sites_across_bridges(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    """MQTT_TOPIC takes comma-separated filters: this bridge serves S01 and S02 only; S03 is another bridge's."""
    bridge = start_bridge(bridges, cloud, broker, MQTT_TOPIC="FCTS/FAE/S01/SolvExtract/+, FCTS/FAE/S02/SolvExtract/+")
    mine, other = readings(["S01", "S02"], per_site=20), readings(["S03"], per_site=20)

    publish(broker.port, other + mine)

    assert cloud.reader.wait_for(len(mine), timeout=30) == expected_ids(mine)
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") == len(mine), 10, "the intake count")


def test_provision_answers_fast_when_nothing_listens_and_when_there_is_nothing_to_do() -> None:
    closed = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "APP_ENV": "LOCAL", "GCP_PROJECT_ID": PROJECT, "PUBSUB_TOPIC": "kpi"}
    env = {key: value for key, value in env.items() if "EMULATOR_HOST" not in key}

    def provision_with(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROOT / "mqtt_subscriber.py"), "provision"]
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=60, check=False)

    started = time.monotonic()
    result = provision_with({"PUBSUB_EMULATOR_HOST": closed})
    assert time.monotonic() - started < 30  # a few seconds, not the client's minutes of retries
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and closed in lines[0] and "PUBSUB_EMULATOR_HOST" in lines[0], result.stderr

    nothing = provision_with({})
    assert nothing.returncode == 0 and "nothing to provision" in nothing.stdout
