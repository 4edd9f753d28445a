"""Fixtures: real Mosquitto, a Pub/Sub server (ours, or Google's emulator via PUBSUB_EMULATOR_HOST), bqemulator."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmi_bridge.config import Config
from fmi_bridge.provision import provision
from tests.pubsub_server import Faults, PubSubServer
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    Published,
    PubSubReader,
    bq_distinct_ids,
    expected_ids,
    site_sequences,
    wait_until,
)

PROJECT = "fmi-test"
_names = itertools.count(1)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker").start()
    yield broker
    broker.kill()


@dataclass
class PubSubEndpoint:
    host: str
    server: PubSubServer | None  # None when an external emulator was given


@pytest.fixture(scope="session")
def pubsub_endpoint() -> Iterator[PubSubEndpoint]:
    external = os.environ.get("PUBSUB_EMULATOR_HOST")
    if external:
        yield PubSubEndpoint(external, None)
        return
    server = PubSubServer().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = server.host  # the test's own clients use it too
    yield PubSubEndpoint(server.host, server)
    server.stop()
    del os.environ["PUBSUB_EMULATOR_HOST"]


@pytest.fixture
def faults(pubsub_endpoint: PubSubEndpoint) -> Iterator[Faults]:
    """Fault injection on Publish; only the test server has it."""
    if pubsub_endpoint.server is None:
        pytest.skip("fault injection needs the test Pub/Sub server, not an external emulator")
    server = pubsub_endpoint.server
    server.state.faults = Faults()
    yield server.state.faults
    server.state.faults = Faults()


@pytest.fixture(scope="session")
def bigquery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    emulator = BigQueryEmulator(tmp_path_factory.mktemp("bq"), PROJECT).start()
    yield emulator
    emulator.stop()


@dataclass
class Cloud:
    env: dict[str, str]
    config: Config
    reader: PubSubReader
    bq: Any
    readings_table: str
    rejects_table: str


def make_cloud(pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator) -> Cloud:
    """A fresh topic, subscription, dataset and tables, provisioned by the bridge's own code."""
    n = next(_names)
    env = {
        "APP_ENV": "DEV",
        "GCP_PROJECT_ID": PROJECT,
        "PUBSUB_TOPIC": f"kpi-{n}",
        "BIGQUERY_DATASET": f"ds_{n}",
        "BIGQUERY_TABLE": "readings",
        "PUBSUB_EMULATOR_HOST": pubsub_endpoint.host,
        "BIGQUERY_EMULATOR_HOST": bigquery.url,
    }
    config = Config.from_env(env)
    provision(config)
    reader = PubSubReader(PROJECT, env["PUBSUB_TOPIC"], f"test-sub-{n}")
    return Cloud(
        env, config, reader, bigquery.client(), f"{PROJECT}.ds_{n}.readings", f"{PROJECT}.ds_{n}.readings_rejected"
    )


@pytest.fixture
def cloud(pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator) -> Iterator[Cloud]:
    setup = make_cloud(pubsub_endpoint, bigquery)
    yield setup
    setup.reader.close()


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Callable[..., Bridge]]:
    """Makes bridge processes sharing one work folder (so one spool); all are killed at the end."""
    made: list[Bridge] = []

    def make(env: dict[str, str]) -> Bridge:
        bridge = Bridge(tmp_path, env)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        bridge.stop()


def start_bridge(bridges: Callable[..., Bridge], cloud: Cloud, broker: Broker, **env: str) -> Bridge:
    """A bridge writing to this test's cloud, reading from this broker, ready."""
    bridge = bridges({**cloud.env, "MQTT_PORT": str(broker.port), **env}).start()
    bridge.wait_ready()
    return bridge


def assert_delivered(cloud: Cloud, messages: list[Published], timeout: float = 90) -> None:
    """Every message reached both sinks (distinct event_id), and per site the first deliveries keep publish order."""
    wanted = expected_ids(messages)
    assert cloud.reader.wait_for(len(wanted), timeout) == wanted
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) >= wanted, timeout, "all rows in BigQuery")
    assert bq_distinct_ids(cloud.bq, cloud.readings_table) == wanted
    for site, seqs in site_sequences(cloud.reader.events()).items():
        assert seqs == sorted(seqs), f"site {site} out of order"
        assert len(seqs) == len(set(seqs))
