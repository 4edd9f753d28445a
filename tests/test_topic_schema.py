"""The KPI event as the topic's Pub/Sub schema, on Google's own emulator (it keeps schemas and enforces them):
the Avro definition and the JSON Schema say the same; provision creates the schema and a topic with it and
never changes an existing topic; check-config says whether the topic's schema is this release's; every kind of
reading the bridge sends is accepted; and a topic whose schema the events do not match holds the lanes, with no
dead letter, until the topic takes them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.pubsub_v1.types import Encoding, Schema, SchemaSettings

from fmi_bridge import cloud as cloud_clients
from fmi_bridge import topic_schema
from fmi_bridge.commands.provision import provision
from fmi_bridge.config import Config
from tests.conftest import PROJECT, Cloud, PubSubEndpoint, assert_delivered, cloud_env, start_bridge
from tests.sinks.bigquery_write_conformance import EMULATOR_LOCK
from tests.support import (
    ROOT,
    BigQueryEmulator,
    Bridge,
    Broker,
    Published,
    PubSubReader,
    bq_query,
    publish,
    readings,
    wait_until,
)

pytestmark = pytest.mark.slow

AVRO_TYPES = {"string": "string", "number": "double", "integer": "int"}
OTHER = json.dumps({"type": "record", "name": "Other", "fields": [{"name": "unit", "type": "string"}]})


@pytest.fixture
def google(google_pubsub: PubSubEndpoint | None, pubsub_endpoint: PubSubEndpoint) -> PubSubEndpoint:
    if google_pubsub is None:
        pytest.skip("Google's Pub/Sub emulator is not installed: only it enforces schemas")
    return pubsub_endpoint


def test_the_avro_definition_and_the_json_schema_describe_the_same_event() -> None:
    avro = json.loads((ROOT / "schemas" / "kpi_event.avsc").read_text())
    described = json.loads((ROOT / "schemas" / "kpi_event.schema.json").read_text())
    assert [field["name"] for field in avro["fields"]] == described["required"]
    assert set(described["properties"]) == set(described["required"]) and not described["additionalProperties"]
    for field in avro["fields"]:
        spec = described["properties"][field["name"]]
        expected = "int" if "const" in spec else AVRO_TYPES[spec["type"]]
        assert field["type"] == expected, field["name"]  # no union: every field is required in both


def check_config(env: dict[str, str], broker: Broker) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "mqtt_subscriber.py"), "check-config"],
        env={**env, "MQTT_PORT": str(broker.port), "PATH": "/usr/bin:/bin", "NO_GCE_CHECK": "True"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_provision_creates_the_schema_and_a_topic_with_it_and_check_config_says_so(
    google: PubSubEndpoint, bigquery: BigQueryEmulator, broker: Broker
) -> None:
    env = cloud_env(google, bigquery)
    env["PUBSUB_SCHEMA"] = f"kpi-event-{env['PUBSUB_TOPIC']}"  # one of its own: the emulator is the session's
    config = Config.from_env(env)
    with EMULATOR_LOCK:
        done = provision(config)
    assert f"created schema projects/{PROJECT}/schemas/{env['PUBSUB_SCHEMA']} (Avro, schemas/kpi_event.avsc)" in done
    topic = cloud_clients.publisher_client(config).get_topic(topic=cloud_clients.topic_path(config))
    assert topic.schema_settings.schema == topic_schema.schema_path(config)
    assert topic.schema_settings.encoding == Encoding.JSON
    with EMULATOR_LOCK:
        again = provision(config)
    assert any(line.endswith("exists, as this release's") for line in again)
    assert (
        check_config(env, broker)["topic_schema"]
        == f"its schema is this release's {topic_schema.schema_path(config)} (JSON encoding)"
    )


def test_an_existing_topic_without_a_schema_is_left_as_it_is_and_named(
    google: PubSubEndpoint, bigquery: BigQueryEmulator, broker: Broker
) -> None:
    env = cloud_env(google, bigquery)
    config = Config.from_env(env)
    publisher = cloud_clients.publisher_client(config)
    publisher.create_topic(name=cloud_clients.topic_path(config))
    with EMULATOR_LOCK:
        done = provision(config)
    (line,) = [line for line in done if line.startswith("topic ")]
    assert "it has no schema" in line and "left as it is" in line and "gcloud pubsub topics update" in line
    assert not publisher.get_topic(topic=cloud_clients.topic_path(config)).schema_settings.schema  # unchanged
    assert "it has no schema" in check_config(env, broker)["topic_schema"]


def test_every_kind_of_reading_the_bridge_sends_is_accepted_by_the_schema(
    broker: Broker, cloud: Cloud, google: PubSubEndpoint, bridges: Callable[..., Bridge]
) -> None:
    """Integral, negative, tiny and huge values, a timestamp with an offset and a fraction, non-ASCII tags,
    extra payload fields: each is one KPI event the schema takes."""
    start_bridge(bridges, cloud, broker)
    bodies = [
        ("MOR", "PI.1", {"value": 7}),
        ("MOR", "PI.2", {"value": -0.000001}),
        ("MOR", "PI.3", {"value": 1.7976931348623157e308}),
        ("BAG", "PI.ÄÖ-温度", {"value": 3.5, "timestamp": "2026-11-20T08:15:30.123456+05:30"}),
        ("BAG", "PI.5", {"value": 0, "unit": "m3/h", "quality": "good"}),
    ]
    messages = [
        Published(
            f"FCTS/FAE/{site}/SolvExtract/{tag}",
            json.dumps({"site_code": site, "sensor_id": "s-1", "timestamp": "2026-11-20T08:15:30Z", **extra}).encode(),
        )
        for site, tag, extra in bodies
    ]
    publish(broker.port, messages)
    assert len(cloud.reader.wait_for(len(messages), 30)) == len(messages)
    delivered = cloud.reader.messages
    assert {m.attributes["googclient_schemaname"] for m in delivered} == {topic_schema.schema_path(cloud.config)}
    assert bq_query(cloud.bq, f"SELECT count(*) FROM `{cloud.rejects_table}`")[0][0] == 0


@pytest.fixture
def mismatched(google: PubSubEndpoint, bigquery: BigQueryEmulator) -> Iterator[tuple[Cloud, str]]:
    """A topic made before provision with another schema (a field the events lack): provision leaves it."""
    env = cloud_env(google, bigquery)
    config = Config.from_env(env)
    schemas = topic_schema.schema_client(config)
    other = f"projects/{PROJECT}/schemas/other-{config.pubsub_topic}"
    schemas.create_schema(
        parent=f"projects/{PROJECT}",
        schema=Schema(type_=Schema.Type.AVRO, definition=OTHER),
        schema_id=other.rsplit("/", 1)[1],
    )
    cloud_clients.publisher_client(config).create_topic(
        request={
            "name": cloud_clients.topic_path(config),
            "schema_settings": SchemaSettings(schema=other, encoding=Encoding.JSON),
        }
    )
    with EMULATOR_LOCK:
        done = provision(config)
    assert any(f"its schema is {other}" in line and "left as it is" in line for line in done), done
    reader = PubSubReader(google.host, PROJECT, str(config.pubsub_topic), f"test-sub-{config.pubsub_topic}")
    dataset = env["BIGQUERY_DATASET"]
    tables = f"{PROJECT}.{dataset}.readings", f"{PROJECT}.{dataset}.readings_rejected"
    yield Cloud(env, config, reader, bigquery.client(), *tables), other
    reader.close()


@pytest.mark.pubsub_refusals
def test_a_topic_whose_schema_the_events_do_not_match_holds_the_lanes_until_it_is_fixed(
    broker: Broker, mismatched: tuple[Cloud, str], bridges: Callable[..., Bridge]
) -> None:
    """Pub/Sub refuses every message ("Could not parse message"): the cause is the topic, so one ERROR naming
    what to do, no dead letter, the readings wait in order; an operator commits this release's definition as a
    revision of the topic's schema, and everything goes, in order per site."""
    cloud, other = mismatched
    bridge = start_bridge(bridges, cloud, broker)
    messages = readings([f"S{n}" for n in range(4)], 50)
    publish(broker.port, messages)

    def refusing() -> list[dict[str, Any]]:
        return [
            e
            for e in bridge.log_entries()
            if e.get("message") == "Pub/Sub refuses every message; the readings stay in the spool"
        ]

    wait_until(refusing, 60, "the topic-wide refusal named")
    time.sleep(3)  # refused again and again meanwhile
    assert len(refusing()) == 1 and "Could not parse message" in refusing()[0]["error"]
    assert "schema" in refusing()[0]["action"]
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total") == 0
    assert bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(messages)

    topic_schema.schema_client(cloud.config).commit_schema(
        name=other, schema=Schema(name=other, type_=Schema.Type.AVRO, definition=topic_schema.definition())
    )
    assert_delivered(cloud, messages, timeout=90)
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total") == 0
    assert bq_query(cloud.bq, f"SELECT count(*) FROM `{cloud.rejects_table}`")[0][0] == 0


def test_check_config_names_a_topic_with_another_schema(mismatched: tuple[Cloud, str], broker: Broker) -> None:
    cloud, other = mismatched
    assert f"its schema is {other}, not" in check_config(cloud.env, broker)["topic_schema"]
