"""PPRD/PRD: the broker takes only TLS clients with passwords, the ACL keeps each site to its own topics, the
bridge connects with TLS and credentials, and secrets come from Secret Manager at start, never from the image."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fmi_bridge.container.broker_conf import BrokerSecurity, acl_text
from tests.conftest import Cloud
from tests.container.secret_manager_server import SecretManagerServer
from tests.support import (
    ROOT,
    Bridge,
    Broker,
    Published,
    bq_distinct_ids,
    connack,
    expected_ids,
    free_port,
    publish,
    reading,
    readings,
    wait_until,
)

BRIDGE_USER, BRIDGE_PASSWORD = "fmi-bridge", "bridge-pass-123"
SITE_PASSWORDS = {"S1": "s1-pass", "S2": "s2-pass"}


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    passwords: Path
    acl: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(d: Path) -> Pki:
    """A throw-away CA, a broker certificate for localhost, and a password file made with mosquitto_passwd."""
    d.mkdir(parents=True, exist_ok=True)
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fmi test CA",
        cwd=d,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
        "-subj",
        "/CN=localhost",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "broker.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=d,
    )
    passwords = d / "passwords"
    for index, (user, password) in enumerate({BRIDGE_USER: BRIDGE_PASSWORD, **SITE_PASSWORDS}.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, password], check=True, timeout=30)
    (d / "acl").write_text(acl_text(BRIDGE_USER))
    return Pki(d / "ca.pem", d / "broker.pem", d / "broker.key", passwords, d / "acl")


@pytest.fixture
def prd_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    security = BrokerSecurity(password_file=pki.passwords, acl_file=pki.acl, tls_cert=pki.cert, tls_key=pki.key)
    broker = Broker(tmp_path / "broker", app_env="PRD", security=security).start()
    yield broker
    broker.kill()


def test_prd_broker_refuses_anonymous_and_plain_tcp_clients(prd_broker: Broker, pki: Pki) -> None:
    assert connack(prd_broker.port, tls_ca=pki.ca) == "Not authorized"
    assert connack(prd_broker.port, BRIDGE_USER, "wrong", tls_ca=pki.ca) == "Not authorized"
    assert connack(prd_broker.port, BRIDGE_USER, BRIDGE_PASSWORD) == "no CONNACK"  # plain TCP to a TLS port
    assert connack(prd_broker.port, BRIDGE_USER, BRIDGE_PASSWORD, tls_ca=pki.ca) == "Success"


def start_prd_bridge(
    bridges: Callable[..., Bridge], cloud: Cloud, broker: Broker, pki: Pki, workdir: Path, **extra: str
) -> Bridge:
    """A PRD bridge: TLS to the broker, its user and a password file (with the newline editors leave)."""
    password_file = workdir / "bridge-password"
    password_file.write_text(BRIDGE_PASSWORD + "\n")
    env = {
        **cloud.env,
        "APP_ENV": "PRD",
        "MQTT_BROKER": "localhost",
        "MQTT_PORT": str(broker.port),
        "MQTT_TLS_CA": str(pki.ca),
        "MQTT_USERNAME": BRIDGE_USER,
        "MQTT_PASSWORD_FILE": str(password_file),
        **extra,
    }
    bridge = bridges(env).start()
    bridge.wait_ready()
    return bridge


def test_bridge_connects_with_tls_and_credentials_and_the_acl_keeps_sites_apart(
    prd_broker: Broker, pki: Pki, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    # The bridge's login may only read. Asked before the bridge runs: a second login with its user name would
    # take its session (the broker binds the client id to the user name), which is the bridge's own to hold.
    assert v5_publish(prd_broker.port, pki, BRIDGE_USER, BRIDGE_PASSWORD, reading("S1", 3)) == "Not authorized"
    bridge = start_prd_bridge(bridges, cloud, prd_broker, pki, tmp_path)
    own_s1, own_s2 = reading("S1", 1), reading("S2", 1)
    s1_posing_as_s2 = reading("S2", 2)

    publish(prd_broker.port, [s1_posing_as_s2, own_s1], username="S1", password=SITE_PASSWORDS["S1"], tls_ca=pki.ca)
    publish(prd_broker.port, [own_s2], username="S2", password=SITE_PASSWORDS["S2"], tls_ca=pki.ca)

    assert cloud.reader.wait_for(2, 30) == expected_ids([own_s1, own_s2])
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") == 2, 10, "the intake count")
    assert BRIDGE_PASSWORD not in bridge.output()
    assert v5_publish(prd_broker.port, pki, "S1", SITE_PASSWORDS["S1"], reading("S2", 4)) == "Not authorized"


def v5_publish(port: int, pki: Pki, user: str, password: str, message: Published) -> str:
    """The broker's PUBACK reason code for one QoS 1 publish over MQTT 5."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    client.tls_set(ca_certs=str(pki.ca))
    answers: list[str] = []
    client.on_publish = lambda c, userdata, mid, reason, properties: answers.append(str(reason))
    client.connect("localhost", port)
    client.publish(message.topic, message.payload, qos=1)
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline and client.loop(timeout=0.1) == mqtt.MQTT_ERR_SUCCESS:
        pass
    client.disconnect()
    return answers[0] if answers else "no PUBACK"


def connect_clean(port: int, pki: Pki, user: str, client_id: str, protocol: int) -> str:
    """A site login that starts clean under the given client id: what the broker answered."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.username_pw_set(user, SITE_PASSWORDS[user])
    client.tls_set(ca_certs=str(pki.ca))
    answers: list[str] = []
    client.on_connect = lambda c, userdata, flags, reason, properties: answers.append(str(reason))
    if protocol == mqtt.MQTTv5:
        client.connect("localhost", port, clean_start=True)
    else:
        client.connect("localhost", port)  # MQTT 3.1.1: paho's client starts a clean session unless told
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline and client.loop(timeout=0.1) == mqtt.MQTT_ERR_SUCCESS:
        pass
    client.disconnect()
    return answers[0] if answers else "no CONNACK"


def test_no_site_login_can_take_or_discard_the_bridges_session(
    prd_broker: Broker, pki: Pki, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    bridge = start_prd_bridge(bridges, cloud, prd_broker, pki, tmp_path)
    assert bridge.terminate() == 0  # its session stays with the broker, queuing
    queued = readings(["S1"], 75)
    publish(prd_broker.port, queued, username="S1", password=SITE_PASSWORDS["S1"], tls_ca=pki.ca)

    # A copied configuration at another site: the bridge's client id (and its user name as an id), clean start.
    for client_id in ("fmi-mqtt-bridge-prd", BRIDGE_USER):
        for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
            assert connect_clean(prd_broker.port, pki, "S2", client_id, protocol) == "Success"

    bridge.start()
    bridge.wait_ready()
    assert cloud.reader.wait_for(len(queued), 60) == expected_ids(queued)
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(queued), 60, "all in BigQuery")


def test_tls_under_load_keeps_one_connection_and_loses_nothing(
    prd_broker: Broker, pki: Pki, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """PUBACKs are written by the link's own thread: an SSL socket shared with the intake thread tore frames."""
    bridge = start_prd_bridge(bridges, cloud, prd_broker, pki, tmp_path)
    messages = readings(["S1"], 20_000)

    publish(prd_broker.port, messages, username="S1", password=SITE_PASSWORDS["S1"], tls_ca=pki.ca)

    assert cloud.reader.wait_for(len(messages), 120) == expected_ids(messages)
    assert bridge.metric("fmi_bridge_mqtt_connects_total") == 1
    assert bridge.metric("fmi_bridge_mqtt_disconnects_total") == 0
    assert "disconnected from broker" not in bridge.output()


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MQTT_", "MOSQUITTO_", "APP_ENV", "BRIDGE_", "SECRET_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "fmi_bridge.container.launch", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_launcher_fetches_secrets_and_the_rendered_prd_broker_works(tmp_path: Path, pki: Pki) -> None:
    project = "fmi-test"

    def version(name: str) -> str:
        return f"projects/{project}/secrets/{name}/versions/latest"

    server = SecretManagerServer(
        {
            version("mosquitto-passwords"): pki.passwords.read_bytes(),
            version("broker-cert"): pki.cert.read_bytes(),
            version("broker-key"): pki.key.read_bytes(),
            version("bridge-password"): BRIDGE_PASSWORD.encode(),
            f"projects/{project}/secrets/broker-ca/versions/7": pki.ca.read_bytes(),
        }
    ).start()
    run_dir, port = tmp_path / "run", free_port()
    env = {
        "APP_ENV": "PRD",
        "GCP_PROJECT_ID": project,
        "BRIDGE_RUN_DIR": str(run_dir),
        "MOSQUITTO_DATA_DIR": str(tmp_path / "mq"),
        "MOSQUITTO_PORT": str(port),
        "MQTT_USERNAME": BRIDGE_USER,
        "SECRET_MANAGER_EMULATOR_HOST": server.host,
        "MOSQUITTO_PASSWORD_FILE_SECRET": "mosquitto-passwords",
        "MOSQUITTO_TLS_CERT_SECRET": "broker-cert",
        "MOSQUITTO_TLS_KEY_SECRET": "broker-key",
        "MQTT_PASSWORD_FILE_SECRET": "bridge-password",
        "MQTT_TLS_CA_SECRET": f"projects/{project}/secrets/broker-ca/versions/7",
    }
    try:
        result = launch(env, "--render")
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    conf = Path(result.stdout.strip())
    text = conf.read_text()
    secrets = run_dir / "secrets"
    assert f"listener {port}" in text and "allow_anonymous false" in text
    assert f"password_file {secrets / 'mosquitto_password_file'}" in text
    assert f"keyfile {secrets / 'mosquitto_tls_key'}" in text
    assert (secrets / "mosquitto_tls_key").read_bytes() == pki.key.read_bytes()
    assert (secrets / "mqtt_password_file").read_text() == BRIDGE_PASSWORD
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert BRIDGE_PASSWORD not in text and "BEGIN" not in text  # the config names files, it holds no secret

    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: connack(port, BRIDGE_USER, BRIDGE_PASSWORD, tls_ca=pki.ca) == "Success", 10, "TLS login")
        assert connack(port, tls_ca=pki.ca) == "Not authorized"
    finally:
        broker.kill()
        broker.wait()


def test_launcher_stops_on_a_missing_secret_naming_it(tmp_path: Path) -> None:
    server = SecretManagerServer({}).start()
    try:
        result = launch(
            {
                "APP_ENV": "PRD",
                "GCP_PROJECT_ID": "p",
                "BRIDGE_RUN_DIR": str(tmp_path / "run"),
                "MOSQUITTO_DATA_DIR": str(tmp_path / "mq"),
                "SECRET_MANAGER_EMULATOR_HOST": server.host,
                "MOSQUITTO_TLS_KEY_SECRET": "nope",
            },
            "--render",
        )
    finally:
        server.stop()
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "MOSQUITTO_TLS_KEY_SECRET=nope" in result.stderr and "NotFound" in result.stderr


def test_launcher_refuses_prd_without_broker_secrets(tmp_path: Path) -> None:
    result = launch(
        {
            "APP_ENV": "PRD",
            "MQTT_USERNAME": BRIDGE_USER,
            "BRIDGE_RUN_DIR": str(tmp_path / "run"),
            "MOSQUITTO_DATA_DIR": str(tmp_path / "mq"),
        },
        "--render",
    )
    assert result.returncode == 2
    assert "MOSQUITTO_PASSWORD_FILE is required when APP_ENV=PRD" in result.stderr


def test_mutual_tls_the_bridge_presents_its_certificate(
    pki: Pki, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """MQTT_TLS_CERT and MQTT_TLS_KEY: against a broker that requires a client certificate, the bridge gets in
    with one signed by the broker's CA, and a client without one does not."""
    keys = tmp_path / "client"
    keys.mkdir()
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "bridge.key", "-out", "bridge.csr", "-subj",
            "/CN=fmi-bridge", cwd=keys)  # fmt: skip
    openssl("x509", "-req", "-in", "bridge.csr", "-CA", str(pki.ca), "-CAkey", str(pki.ca.parent / "ca.key"),
            "-CAcreateserial", "-out", "bridge.pem", "-days", "2", cwd=keys)  # fmt: skip
    security = BrokerSecurity(
        password_file=pki.passwords, acl_file=pki.acl, tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca
    )
    broker = Broker(tmp_path / "broker", app_env="PRD", security=security)
    broker.conf.write_text(broker.conf.read_text().replace("require_certificate false", "require_certificate true"))
    broker.start()
    try:
        assert connack(broker.port, BRIDGE_USER, BRIDGE_PASSWORD, tls_ca=pki.ca) != "Success"  # no certificate
        certificate = {"MQTT_TLS_CERT": str(keys / "bridge.pem"), "MQTT_TLS_KEY": str(keys / "bridge.key")}
        bridge = start_prd_bridge(bridges, cloud, broker, pki, tmp_path, **certificate)
        assert bridge.metric("fmi_bridge_mqtt_connects_total") == 1
    finally:
        broker.kill()
