"""Fixtures: real Mosquitto, Google's Pub/Sub emulator (the in-repo test server where faults are injected, or
where the emulator is not installed), and bqemulator. Every endpoint is passed explicitly, never through the
test process's environment, so the two Pub/Sub backends can serve one session side by side."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmi_bridge.commands.provision import provision
from fmi_bridge.config import Config
from tests.sinks.bigquery_write_conformance import EMULATOR_LOCK, WriteApiConformance, table_info_from
from tests.sinks.pubsub_conformance import PubSubConformanceLayer
from tests.sinks.pubsub_server import Faults, PubSubServer
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    GooglePubSubEmulator,
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
    host: str  # the conformance layer's: every test's Pub/Sub traffic goes through it
    server: PubSubServer | None  # None for Google's emulator
    name: str
    layer: PubSubConformanceLayer


def _behind_layer(backend: str, server: PubSubServer | None, name: str) -> PubSubEndpoint:
    layer = PubSubConformanceLayer(backend).start()
    return PubSubEndpoint(layer.host, server, name, layer)


BACKEND_USE: Counter[str] = Counter()  # tests per Pub/Sub backend, for the summary


@pytest.fixture(scope="session")
def google_pubsub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEndpoint | None]:
    """Google's emulator on a free port, or None where it is not installed."""
    external = os.environ.get("PUBSUB_EMULATOR_HOST")
    if external:
        endpoint = _behind_layer(external, None, f"the emulator at {external}")
        yield endpoint
        endpoint.layer.stop()
        return
    if not GooglePubSubEmulator.installed():
        yield None
        return
    emulator = GooglePubSubEmulator(tmp_path_factory.mktemp("pubsub-emulator")).start()
    endpoint = _behind_layer(emulator.host, None, "Google's Pub/Sub emulator")
    yield endpoint
    endpoint.layer.stop()
    emulator.stop()


@pytest.fixture(scope="session")
def pubsub_test_server() -> Iterator[PubSubEndpoint]:
    server = PubSubServer().start()
    endpoint = _behind_layer(server.host, server, "the in-repo Pub/Sub test server")
    yield endpoint
    endpoint.layer.stop()
    server.stop()


@pytest.fixture
def pubsub_endpoint(request: pytest.FixtureRequest, google_pubsub: PubSubEndpoint | None) -> Iterator[PubSubEndpoint]:
    """Google's emulator, unless the test injects faults (only the test server can) or it is not installed;
    either behind the conformance layer. A test that the layer had to refuse a request for fails, unless it is
    marked `pubsub_refusals` (it sends one on purpose)."""
    needs_faults = "faults" in request.fixturenames
    endpoint = google_pubsub if google_pubsub and not needs_faults else request.getfixturevalue("pubsub_test_server")
    BACKEND_USE[endpoint.name] += 1
    endpoint.layer.reset()
    yield endpoint
    if request.node.get_closest_marker("pubsub_refusals") is None:
        assert not endpoint.layer.refusals, f"the bridge sent what Google's Pub/Sub refuses: {endpoint.layer.refusals}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if BACKEND_USE:
        used = ", ".join(f"{name}: {count} tests" for name, count in BACKEND_USE.most_common())
        terminalreporter.write_line(f"Pub/Sub backends: {used}")
    if not GooglePubSubEmulator.installed() and not os.environ.get("PUBSUB_EMULATOR_HOST"):
        terminalreporter.write_line(
            "Google's Pub/Sub emulator is not installed: every Pub/Sub test ran against the in-repo test server"
        )
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:  # a skip hides a guarantee: say which, and why, where nobody has to ask for -rs
        terminalreporter.write_line(f"Guarantees NOT checked in this run ({len(skipped)} skipped):")
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"  {report.nodeid}: {reason.removeprefix('Skipped: ')}")


@pytest.fixture
def faults(pubsub_endpoint: PubSubEndpoint) -> Iterator[Faults]:
    """Fault injection on Publish; only the test server has it."""
    assert pubsub_endpoint.server is not None
    server = pubsub_endpoint.server
    server.state.faults = Faults()
    yield server.state.faults
    server.state.faults = Faults()


@pytest.fixture(scope="session")
def bigquery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    emulator = BigQueryEmulator(tmp_path_factory.mktemp("bq"), PROJECT).start()
    yield emulator
    emulator.stop()
    write_layer(emulator).stop()


@pytest.fixture
def own_bigquery(tmp_path: Path) -> Iterator[BigQueryEmulator]:
    """A BigQuery emulator of this test's own, for the Write API (the tests stop and start it)."""
    emulator = BigQueryEmulator(tmp_path, PROJECT).start()
    yield emulator
    assert emulator.process is not None
    emulator.process.send_signal(signal.SIGCONT)
    emulator.stop()
    write_layer(emulator).stop()


# (emulator, its layer): the emulator is kept referenced, so a later one can never be taken for it.
_write_layers: list[tuple[BigQueryEmulator, WriteApiConformance]] = []


def write_layer(bigquery: BigQueryEmulator) -> WriteApiConformance:
    """The Storage Write API as Google's service takes it: the conformance layer in front of this emulator, one
    per emulator."""
    for emulator, layer in _write_layers:
        if emulator is bigquery:
            return layer
    layer = WriteApiConformance(bigquery.grpc_host, table_info_from(bigquery.client())).start()
    _write_layers.append((bigquery, layer))
    return layer


@pytest.fixture(autouse=True)
def _write_api_refusals(request: pytest.FixtureRequest) -> Iterator[None]:
    """A refusal by one of the Write API layer's rules fails the test unless it is marked `bigquery_refusals`
    (it causes one on purpose). Fault injection ("injected") is not a refusal of a rule."""
    seen = {id(layer): len(layer.refusals) for _, layer in _write_layers}
    yield
    refused = [
        f"{rule}: {detail}"
        for _, layer in _write_layers
        for rule, detail in layer.refusals[seen.get(id(layer), 0) :]
        if rule != "injected"
    ]
    if refused and request.node.get_closest_marker("bigquery_refusals") is None:
        pytest.fail("Google's BigQuery would have refused: " + "; ".join(refused[:3]))


@pytest.fixture
def write_api(own_bigquery: BigQueryEmulator) -> WriteApiConformance:
    return write_layer(own_bigquery)


@dataclass
class Cloud:
    env: dict[str, str]
    config: Config
    reader: PubSubReader
    bq: Any
    readings_table: str
    rejects_table: str


def cloud_env(pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator) -> dict[str, str]:
    """A DEV environment on the emulators with a topic and dataset of its own, not yet provisioned."""
    n = next(_names)
    return {
        "APP_ENV": "DEV",
        "GCP_PROJECT_ID": PROJECT,
        "PUBSUB_TOPIC": f"kpi-{n}",
        "BIGQUERY_DATASET": f"ds_{n}",
        "BIGQUERY_TABLE": "readings",
        "PUBSUB_EMULATOR_HOST": pubsub_endpoint.host,
        "BIGQUERY_EMULATOR_HOST": bigquery.url,
        # The Storage Write API, as in production, through the layer that refuses what BigQuery refuses.
        "BIGQUERY_STORAGE_EMULATOR_HOST": write_layer(bigquery).host,
    }


def make_cloud(pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator) -> Cloud:
    """A fresh topic, subscription, dataset and tables, provisioned by the bridge's own code."""
    env = cloud_env(pubsub_endpoint, bigquery)
    config = Config.from_env(env)
    with EMULATOR_LOCK:  # bqemulator can deadlock on a REST call that meets an append still being forwarded
        provision(config)
    topic, dataset = env["PUBSUB_TOPIC"], env["BIGQUERY_DATASET"]
    reader = PubSubReader(pubsub_endpoint.host, PROJECT, topic, f"test-sub-{topic}")
    tables = f"{PROJECT}.{dataset}.readings", f"{PROJECT}.{dataset}.readings_rejected"
    return Cloud(env, config, reader, bigquery.client(), *tables)


@pytest.fixture
def cloud(pubsub_endpoint: PubSubEndpoint, bigquery: BigQueryEmulator) -> Iterator[Cloud]:
    setup = make_cloud(pubsub_endpoint, bigquery)
    yield setup
    setup.reader.close()


@pytest.fixture
def own_cloud(pubsub_endpoint: PubSubEndpoint, own_bigquery: BigQueryEmulator) -> Iterator[Cloud]:
    """As `cloud`, on a BigQuery emulator of the test's own."""
    setup = make_cloud(pubsub_endpoint, own_bigquery)
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
    published: dict[str, list[int]] = {}
    for message in messages:
        body = json.loads(message.payload)
        published.setdefault(body["site_code"], []).append(int(body["value"]))
    # First deliveries per site: exactly the published sequence, in publish order (nothing missing, nothing moved).
    assert site_sequences(cloud.reader.events()) == published
