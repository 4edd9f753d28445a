"""APP_ENV=LOCAL: every event is logged and nothing leaves the machine."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.support import (
    LOCAL_ONLY,
    Bridge,
    Broker,
    Published,
    expected_ids,
    listening_on,
    publish,
    readings,
    wait_until,
)


class ConnectionTrap:
    """A listener standing in for every proxy: any outbound HTTP or gRPC attempt would connect here."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def trap() -> Iterator[ConnectionTrap]:
    trap = ConnectionTrap()
    yield trap
    trap.sock.close()


def test_local_logs_each_event_and_makes_no_cloud_call(
    broker: Broker, bridges: Callable[..., Bridge], trap: ConnectionTrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    proxies = {name: trap.url for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "grpc_proxy")}
    env = {
        "APP_ENV": "LOCAL",
        "MQTT_PORT": str(broker.port),
        "GCP_PROJECT_ID": "would-be-real",
        "PUBSUB_TOPIC": "kpi",
        "BIGQUERY_DATASET": "fmi",
        "BIGQUERY_TABLE": "readings",
        "NO_PROXY": "",
        **proxies,
    }
    assert "PUBSUB_EMULATOR_HOST" not in os.environ
    bridge = bridges(env).start()
    bridge.wait_ready()
    messages = readings(["MOR", "BAG"], per_site=20)
    bad = Published("FCTS/FAE/MOR/SolvExtract/TAG1", b"not json at all")

    publish(broker.port, [*messages, bad])

    def logged_ids() -> set[str]:
        return {e["event_id"] for e in bridge.log_entries() if e.get("message") == "reading"}

    wait_until(lambda: logged_ids() == expected_ids(messages), 30, "every reading in the log")
    rejected = wait_until(lambda: [line for line in bridge.output().splitlines() if "bad_json" in line], 10, "reject")
    assert len(rejected) == 1  # logged once: by the log sink, LOCAL's rejects table
    assert json.loads(rejected[0])["message"] == "message rejected"  # as the intake logs one beside the cloud
    assert trap.connections == 0
    assert bridge.metric("fmi_bridge_sink_sent_total", 'sink="log"') == len(messages) + 1  # and the reject
    assert bridge.metric("fmi_bridge_sink_sent_total", 'sink="pubsub"') == 0


def test_listen_address_overrides_where_the_health_port_listens(broker: Broker, bridges: Callable[..., Bridge]) -> None:
    local = bridges({**LOCAL_ONLY, "MQTT_PORT": str(broker.port), "LISTEN_ADDRESS": "0.0.0.0"}).start()
    local.wait_ready()
    assert listening_on(local.port) == {"0.0.0.0"}  # every interface, as asked (LOCAL's own default: 127.0.0.1)
    assert listening_on(local.metrics_port) == {"127.0.0.1"}  # /metrics stays on loopback whatever is asked
