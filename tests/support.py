"""Real components for the tests: Mosquitto, the BigQuery emulator, the bridge process, publishers and readers."""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fmi_bridge.container.broker_conf import BrokerSecurity, render
from tests.sinks.bigquery_write_conformance import EMULATOR_LOCK

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "FCTS/FAE/{site}/SolvExtract/{tag}"
# Plain LOCAL: no emulator host inherited from the session's cloud fixtures, so the log sink stands in.
LOCAL_ONLY = {"APP_ENV": "LOCAL", "PUBSUB_EMULATOR_HOST": "", "BIGQUERY_EMULATOR_HOST": ""}


def venv_tool(name: str) -> str:
    """A command installed into the project's environment (by `make`), never one found on PATH by luck."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed in {path.parent}: run make setup"
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a local GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def listening_on(port: int) -> set[str]:
    """The IPv4 addresses a TCP port listens on, from /proc/net/tcp (0.0.0.0: every interface)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- Mosquitto -------------------------------------------------------------------------------------------


class Broker:
    """Debian's mosquitto with the shipped configuration, on a free port."""

    def __init__(self, workdir: Path, app_env: str = "LOCAL", security: BrokerSecurity | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.data_dir = workdir / "mosquitto"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            render(
                app_env,
                port=self.port,
                data_dir=self.data_dir,
                run_as=getpass.getuser(),
                security=security,
                bind_address="127.0.0.1",
            )
        )
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=log)
        wait_until(lambda: port_open(self.port) or self.process.poll() is not None, 10, "mosquitto to listen")
        assert self.process.poll() is None, self.log.read_text()
        return self

    def stop(self) -> None:
        """Graceful: SIGTERM, so mosquitto saves its persistence file."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# -- BigQuery emulator -------------------------------------------------------------------------------------


def bqemulator_python() -> str:
    explicit = os.environ.get("BQEMULATOR_PYTHON")
    if explicit:
        return explicit
    return str(ROOT / ".venv-bqemulator" / "bin" / "python")


class BigQueryEmulator:
    """bqemulator from PyPI, in its own virtual environment (its pins clash with ours)."""

    def __init__(self, workdir: Path, project: str, persistent: bool = False) -> None:
        self.workdir = workdir
        self.project = project
        self.persistent = persistent
        self.rest_port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.rest_port}"
        self.grpc_host = f"127.0.0.1:{self.grpc_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BigQueryEmulator:
        command = [
            bqemulator_python(),
            "-m",
            "bqemulator",
            "start",
            "--rest-port",
            str(self.rest_port),
            "--grpc-port",
            str(self.grpc_port),
            "--project",
            self.project,
            "--log-level",
            "warning",
        ]
        if self.persistent:
            command += ["--persistent", "--data-dir", str(self.workdir / "bq-data")]
        with (self.workdir / "bqemulator.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=self.workdir)
        wait_until(lambda: self._answers() or self.process.poll() is not None, 60, "the BigQuery emulator")
        assert self.process.poll() is None, (self.workdir / "bqemulator.log").read_text()[-2000:]
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/bigquery/v2/projects/{self.project}/datasets", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(
            project=self.project, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url}
        )


# -- Google's Pub/Sub emulator ------------------------------------------------------------------------------


class GooglePubSubEmulator:
    """The Cloud SDK's Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator), on a free port."""

    COMMAND = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = workdir / "pubsub-emulator.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def installed(cls) -> bool:
        """PUBSUB_TEST_BACKEND=server runs the suite as on a machine without it (the fallback the README names)."""
        return cls.COMMAND.exists() and os.environ.get("PUBSUB_TEST_BACKEND") != "server"

    def start(self) -> GooglePubSubEmulator:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.COMMAND), "--host=127.0.0.1", f"--port={self.port}"],
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                start_new_session=True,  # its java child goes with the group on stop
            )
        wait_until(
            lambda: "Server started" in self.log.read_text(errors="replace") or self.process.poll() is not None,
            90,
            "Google's Pub/Sub emulator",
        )
        assert self.process.poll() is None, self.log.read_text(errors="replace")[-2000:]
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """The sum of a metric's samples in a Prometheus text page that carry every one of `labels` (e.g.
    'lane="pubsub/1"' matches each code of that lane); 0 when none has a sample yet."""
    wanted = set(re.findall(r'\w+="[^"]*"', labels))
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric == name and wanted <= set(re.findall(r'\w+="[^"]*"', label_text)):
            total += float(value)
    return total


# -- The bridge under test ---------------------------------------------------------------------------------


class Bridge:
    """`python mqtt_subscriber.py` as Supervisor starts it, with its stdout kept for the test to read."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "METRICS_PORT": str(self.metrics_port),
            "SPOOL_DIR": str(workdir / "spool"),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.log = workdir / "bridge.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Bridge:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "mqtt_subscriber.py"), *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        return self

    def status(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(
            lambda: self.status("/readiness_check")[0] == 200 or not self.alive(), timeout, "the bridge to be ready"
        )
        assert self.alive(), self.output()[-3000:]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def metric(self, name: str, labels: str = "") -> float:
        """The metric's value; 0 when it has no sample yet; NaN when the bridge does not answer (so a wait for
        "0 left" cannot pass on a bridge that is not up)."""
        status, text = self.metrics_page()
        if status != 200:
            return math.nan
        return metric_sum(text, name, labels)

    def metrics_page(self) -> tuple[int, str]:
        """/metrics, from the loopback listener that serves it."""
        return http_get(int(self.env["METRICS_PORT"]), "/metrics")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 40) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries


# -- Publishing and reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes


def reading(site: str, seq: int, tag: str = "TAG1", sensor: str = "s1") -> Published:
    """A valid reading whose value is its sequence number, so order can be checked downstream."""
    body = {
        "site_code": site,
        "sensor_id": sensor,
        "timestamp": f"2026-11-01T00:00:{seq % 60:02d}.{seq:06d}+00:00",
        "value": float(seq),
        "seq": seq,
    }
    return Published(TOPIC.format(site=site, tag=tag), json.dumps(body).encode())


def readings(sites: Iterable[str], per_site: int, start: int = 0) -> list[Published]:
    """Interleaved across sites, as a site gateway fleet would publish."""
    return [reading(site, seq) for seq in range(start, start + per_site) for site in sites]


def mqtt_client(username: str | None = None, password: str | None = None, tls_ca: Path | None = None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{os.getpid()}-{time.monotonic_ns()}")
    if username:
        client.username_pw_set(username, password)
    if tls_ca:
        client.tls_set(ca_certs=str(tls_ca))
    return client


def publish(
    port: int,
    messages: list[Published],
    qos: int = 1,
    username: str | None = None,
    password: str | None = None,
    tls_ca: Path | None = None,
) -> None:
    """Publish from one connection, so the broker sees exactly this order; returns when all are acknowledged."""
    client = mqtt_client(username, password, tls_ca)
    client.max_inflight_messages_set(0)  # our own window below: paho's large windows are slow
    client.max_queued_messages_set(0)
    client.connect("localhost" if tls_ca else "127.0.0.1", port)
    client.loop_start()
    try:
        window = []
        for message in messages:
            window.append(client.publish(message.topic, message.payload, qos=qos))
            if len(window) >= 500:
                window.pop(0).wait_for_publish(30)
        for info in window:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def connack(port: int, username: str | None = None, password: str | None = None, tls_ca: Path | None = None) -> str:
    """What the broker answers to a connection attempt: a CONNACK reason, or why there was none."""
    client = mqtt_client(username, password, tls_ca)
    answers: list[str] = []
    client.on_connect = lambda c, userdata, flags, reason, properties: answers.append(str(reason))
    try:
        client.connect("localhost" if tls_ca else "127.0.0.1", port, keepalive=5)
    except OSError as exc:
        return f"connection failed: {exc}"
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
            break
    client.disconnect()
    return answers[0] if answers else "no CONNACK"


def mosquitto_pub(port: int, topic: str, payload: bytes | str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    data = payload.encode() if isinstance(payload, str) else payload
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-s", *extra],
        input=data,
        capture_output=True,
        timeout=20,
        check=False,
    )


class PubSubReader:
    """Reads the topic through an ordered subscription, made before anything is published (Google's emulator
    keeps only what arrives while a subscription exists), with the real SubscriberClient."""

    def __init__(self, host: str, project: str, topic: str, name: str) -> None:
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        from fmi_bridge.cloud import emulator_transport

        self.client = pubsub_v1.SubscriberClient(**emulator_transport(host, SubscriberGrpcTransport))
        self.path = self.client.subscription_path(project, name)
        self.client.create_subscription(
            request={"name": self.path, "topic": f"projects/{project}/topics/{topic}", "enable_message_ordering": True}
        )
        self.messages: list[Any] = []

    def pull(self) -> int:
        response = self.client.pull(request={"subscription": self.path, "max_messages": 1000}, timeout=10)
        if response.received_messages:
            self.client.acknowledge(
                request={"subscription": self.path, "ack_ids": [m.ack_id for m in response.received_messages]}
            )
        self.messages.extend(m.message for m in response.received_messages)
        return len(response.received_messages)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(message.data) for message in self.messages]

    def distinct_ids(self) -> set[str]:
        return {event["event_id"] for event in self.events()}

    def wait_for(self, count: int, timeout: float) -> set[str]:
        def enough() -> bool:
            self.pull()
            return len(self.distinct_ids()) >= count

        try:
            wait_until(enough, timeout, f"{count} distinct events in Pub/Sub", 0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {len(self.distinct_ids())}") from None
        return self.distinct_ids()

    def close(self) -> None:
        self.client.close()


def site_sequences(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per site, the sequence numbers in delivery order, first delivery of each event only."""
    seen: set[str] = set()
    order: dict[str, list[int]] = {}
    for event in events:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        order.setdefault(event["site_code"], []).append(int(event["value"]))
    return order


def expected_ids(messages: list[Published]) -> set[str]:
    from fmi_bridge.readings import event_id_for

    return {event_id_for(message.topic, message.payload) for message in messages}


def bq_query(client: Any, sql: str) -> list[Any]:
    with EMULATOR_LOCK:  # never beside an append the conformance layer forwards: bqemulator could deadlock
        return list(client.query(sql).result())


def bq_distinct_ids(client: Any, table: str) -> set[str]:
    return {row[0] for row in bq_query(client, f"SELECT DISTINCT event_id FROM `{table}`")}


# -- The Cloud SDK's own code, offline --------------------------------------------------------------------------

CLOUD_SDK = Path("/usr/lib/google-cloud-sdk")
SDK_PYTHON = CLOUD_SDK / "platform" / "bundledpythonunix" / "bin" / "python3"


def cloud_sdk_python(script: str, *args: str) -> list[dict[str, Any]]:
    """Run `script` with the Cloud SDK's bundled Python and its libraries (what gcloud itself runs); return the
    JSON objects it printed, one a line. Skips where the SDK is not installed."""
    if not SDK_PYTHON.exists():
        pytest.skip(f"the Cloud SDK is not installed ({SDK_PYTHON} missing)")
    result = subprocess.run(
        [str(SDK_PYTHON), "-c", script, *args],
        env={"PYTHONPATH": f"{CLOUD_SDK / 'lib'}:{CLOUD_SDK / 'lib' / 'third_party'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


class ResendingPublisher(threading.Thread):
    """A site gateway at QoS 1 that publishes at a steady rate and, whenever its connection drops, publishes
    again everything the broker had not acknowledged (same topic and payload: the same readings), as a real
    QoS 1 publisher does after it reconnects."""

    def __init__(self, port: int, messages: list[Published], per_second: float, timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = messages
        self.per_second = per_second
        self.timeout = timeout
        self.resent = 0  # messages published again after a lost connection
        self.sent = 0  # first publishes
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._publish_all()
        except Exception as exc:  # the test reads it: a publisher that gave up fails it
            self.error = f"{type(exc).__name__}: {exc}"

    def _publish_all(self) -> None:
        deadline = time.monotonic() + self.timeout
        queue = deque(self.messages)
        unacked: dict[int, Published] = {}
        while (queue or unacked) and time.monotonic() < deadline:
            client = mqtt_client()
            client.max_inflight_messages_set(0)
            client.max_queued_messages_set(0)
            client.on_publish = lambda c, userdata, mid, reason, properties: unacked.pop(mid, None)
            try:
                client.connect("127.0.0.1", self.port, keepalive=5)
            except OSError:
                time.sleep(0.1)
                continue
            again = list(unacked.values())
            unacked.clear()
            self.resent += len(again)
            for message in again:
                unacked[client.publish(message.topic, message.payload, qos=1).mid] = message
            started, published = time.monotonic(), 0
            while (queue or unacked) and time.monotonic() < deadline:
                due = int((time.monotonic() - started) * self.per_second) - published
                for _ in range(min(due, len(queue))):
                    message = queue.popleft()
                    unacked[client.publish(message.topic, message.payload, qos=1).mid] = message
                    published += 1
                    self.sent += 1
                if client.loop(timeout=0.005) != mqtt.MQTT_ERR_SUCCESS:
                    break  # the broker went away: reconnect and publish again what it did not acknowledge
            with contextlib.suppress(Exception):
                client.disconnect()
        if queue or unacked:
            raise TimeoutError(f"{len(queue)} not published, {len(unacked)} not acknowledged")
