"""The MQTT side on a real Mosquitto: retained readings are not ingested again on reconnects, and a QoS 0 flood
against a spool that takes nothing leaves the bridge's memory bounded (the broker holds or drops it)."""

from __future__ import annotations

import getpass
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fmi_bridge.mqtt.inbox import MAX_MESSAGES
from tests.conftest import Cloud, start_bridge
from tests.support import (
    LOCAL_ONLY,
    Bridge,
    Broker,
    Published,
    bq_query,
    expected_ids,
    free_port,
    port_open,
    publish,
    reading,
    readings,
    wait_until,
)

pytestmark = pytest.mark.slow


def test_a_retained_reading_is_ingested_once_across_restarts(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    retained = reading("MOR", 7)
    sent = subprocess.run(
        ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-r", "-t", retained.topic, "-s"],
        input=retained.payload,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert sent.returncode == 0
    (event_id,) = expected_ids([retained])

    bridge = start_bridge(bridges, cloud, broker)  # a new session: the broker's retained reading comes once
    wait_until(lambda: bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"') >= 1, 30, "the insert")
    assert bridge.metric("fmi_bridge_mqtt_retained_total") == 1
    for _ in range(2):
        assert bridge.terminate() == 0
        bridge.start()
        bridge.wait_ready()
    wait_until(lambda: bridge.metric("fmi_bridge_mqtt_connects_total") == 1, 10, "the third run connected")
    # A retained message is sent on subscribing, before anything published later: once a reading published now
    # has landed, a retained one sent again would have landed too.
    marker = reading("BAG", 1)
    publish(broker.port, [marker])
    assert cloud.reader.wait_for(2, 30) == expected_ids([retained, marker])
    wait_until(lambda: bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"] >= 2, 30, "")

    rows = bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}` WHERE event_id = '{event_id}'")
    assert rows[0]["n"] == 1  # rows, not distinct ids: the emulator does not deduplicate
    cloud.reader.pull()
    assert len(cloud.reader.messages) == 2
    assert bridge.metric("fmi_bridge_mqtt_retained_total") == 0  # this run's resumed session got none


def peak_rss_mib(bridge: Bridge) -> float:
    assert bridge.process is not None
    for line in Path(f"/proc/{bridge.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(600)  # above the flood's own bound (240 s), so a slow flood fails here, not in pytest's timer
def test_a_qos0_flood_against_a_spool_that_takes_nothing_keeps_memory_bounded(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    # A free-space floor no disk meets: the spool refuses everything, as when it is full.
    bridge = bridges({**LOCAL_ONLY, "MQTT_PORT": str(broker.port), "SPOOL_MIN_FREE_BYTES": str(2**60)}).start()
    wait_until(lambda: bridge.status("/liveness_check")[0] == 200, 30, "the bridge up")
    wait_until(lambda: "subscribed" in bridge.output(), 30, "the subscription")
    flood, count = tmp_path / "flood.txt", 400_000
    line = b'{"site_code":"MOR","sensor_id":"FT-1","timestamp":"2026-11-20T08:00:00Z","value":1,"pad":"%s"}\n'
    with flood.open("wb") as out:
        out.write(line % (b"x" * 1950) * count)
    topic = "FCTS/FAE/MOR/SolvExtract/FLOOD"

    with flood.open("rb") as source:
        sent = subprocess.run(
            ["mosquitto_pub", "-p", str(broker.port), "-q", "0", "-t", topic, "-l"],
            stdin=source,
            capture_output=True,
            timeout=240,
            check=False,
        )

    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: bridge.metric("fmi_bridge_inbox_messages") == MAX_MESSAGES, 30, "the inbox at its bound")
    peak = peak_rss_mib(bridge)
    print(f"\nQoS 0 flood of {count} x 2 KiB with the spool refusing: bridge peak RSS {peak:.1f} MiB")
    assert peak < 150
    assert bridge.alive()
    # The link kept reading (keepalive answered): what the inbox could not hold was dropped and counted.
    assert bridge.metric("fmi_bridge_mqtt_qos0_dropped_total") > 0
    assert bridge.metric("fmi_bridge_mqtt_disconnects_total") == 0


def test_the_session_survives_a_spool_that_takes_nothing_for_three_keepalives(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """A write lock held on the spool stalls the intake; large readings fill the inbox by bytes. The link must
    still answer keepalive, or the broker drops the session and sends again what the intake then commits."""
    keepalive = 2
    bridge = start_bridge(bridges, cloud, broker, MQTT_KEEPALIVE=str(keepalive))
    pad = "x" * 40_000
    large = [
        Published(message.topic, message.payload[:-1] + f', "pad": "{pad}"}}'.encode())
        for message in readings(["MOR", "BAG"], 600)
    ]
    holder = sqlite3.connect(tmp_path / "spool" / "spool.db", timeout=5)
    holder.execute("BEGIN EXCLUSIVE")  # the spool takes nothing while this is held
    try:
        publish(broker.port, large)
        wait_until(lambda: bridge.metric("fmi_bridge_inbox_messages") > 0, 30, "the inbox filling")
        time.sleep(3 * keepalive + 2)  # three keepalive periods and more with nothing committed
        assert bridge.metric("fmi_bridge_mqtt_disconnects_total") == 0
    finally:
        holder.rollback()
        holder.close()

    assert cloud.reader.wait_for(len(large), 120) == expected_ids(large)
    wait_until(
        lambda: bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"] >= len(large),
        120,
        "every row in BigQuery",
    )
    time.sleep(2)  # anything sent twice would arrive by now
    cloud.reader.pull()
    assert len(cloud.reader.messages) == len(large)  # messages, not distinct ids: none sent twice
    assert bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"] == len(large)
    assert bridge.metric("fmi_bridge_mqtt_disconnects_total") == 0


def test_the_inbox_holds_one_connections_worth_across_reconnects_while_intake_is_held(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """Intake held (the spool write-locked) while the broker restarts three times: each resumed session gets the
    un-acknowledged deliveries again. The inbox keeps one connection's worth (Receive Maximum), not one per
    reconnect, and once intake goes on every reading is one row."""
    receive_maximum = 50
    bridge = start_bridge(bridges, cloud, broker, MQTT_RECEIVE_MAXIMUM=str(receive_maximum))
    messages = readings(["MOR", "BAG"], 200)
    holder = sqlite3.connect(tmp_path / "spool" / "spool.db", timeout=5)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        publish(broker.port, messages)
        wait_until(lambda: bridge.metric("fmi_bridge_mqtt_connects_total") >= 1, 10, "a connection")
        for restart in range(3):
            connects = bridge.metric("fmi_bridge_mqtt_connects_total")
            broker.stop()
            broker.start()
            wait_until(lambda c=connects: bridge.metric("fmi_bridge_mqtt_connects_total") > c, 30, "a reconnect")
            wait_until(lambda: bridge.metric("fmi_bridge_inbox_messages") >= receive_maximum, 30, "redeliveries")
            time.sleep(1)
            assert bridge.metric("fmi_bridge_inbox_messages") <= receive_maximum, f"after restart {restart + 1}"
    finally:
        holder.rollback()
        holder.close()

    wait_until(
        lambda: bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"] >= len(messages),
        120,
        "every row in BigQuery",
    )
    time.sleep(2)
    assert bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"] == len(messages)


DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


@pytest.mark.skipif(not Path(DYNSEC).exists(), reason="Debian's Mosquitto dynamic security plugin is not installed")
def test_a_refused_subscription_is_named_keeps_readiness_failing_and_is_asked_again(
    bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """Mosquitto's acl_file grants every subscription and filters delivery; its dynamic security plugin refuses a
    subscription the client's roles do not allow (SUBACK 0x87), as a broker an operator secured that way would."""
    port, security = free_port(), tmp_path / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(security), "admin", "admin-pass"], check=True, timeout=30)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"per_listener_settings false\nplugin {DYNSEC}\nplugin_opt_config_file {security}\n"
        f"listener {port} 127.0.0.1\nallow_anonymous false\nuser {getpass.getuser()}\n"
    )
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 10, "mosquitto to listen")

        def dynsec(*args: str) -> None:
            ctrl = ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(port), "-u", "admin", "-P", "admin-pass"]
            subprocess.run([*ctrl, "dynsec", *args], check=True, timeout=30, capture_output=True)

        dynsec("createClient", "bridge", "-p", "bridge-pass")  # by default no client may subscribe
        dynsec("createClient", "site", "-p", "site-pass")
        dynsec("createRole", "writer")
        dynsec("addRoleACL", "writer", "publishClientSend", "FCTS/FAE/#", "allow")
        dynsec("addClientRole", "site", "writer")
        bridge = bridges(
            {**LOCAL_ONLY, "MQTT_PORT": str(port), "MQTT_USERNAME": "bridge", "MQTT_PASSWORD": "bridge-pass"}
        ).start()

        def refusals() -> list[dict[str, Any]]:
            return [e for e in bridge.log_entries() if e.get("message", "").startswith("broker refused the subscr")]

        first, again = wait_until(lambda: refusals()[:2] if len(refusals()) >= 2 else None, 30, "a second ask")
        assert first["severity"] == "ERROR" and "0x87" in first["reasons"][0]  # Not authorized
        assert first["retry_in_seconds"] <= 1.0 <= again["retry_in_seconds"]  # backoff: 1 s doubling, jittered
        assert bridge.metric("fmi_bridge_mqtt_connects_total") == 1  # asked again on the same connection
        status, text = bridge.status("/readiness_check")
        assert status == 503 and "refused the subscription" in text and "0x87" in text

        dynsec("createRole", "reader")  # the operator grants it (the plugin then drops the client to apply it)
        dynsec("addRoleACL", "reader", "subscribePattern", "FCTS/FAE/#", "allow")
        dynsec("addClientRole", "bridge", "reader")

        bridge.wait_ready(90)
        publish(port, [reading("MOR", 1)], username="site", password="site-pass")
        wait_until(lambda: bridge.metric("fmi_bridge_messages_accepted_total") == 1, 30, "a reading through")
    finally:
        broker.kill()
        broker.wait(10)


def test_a_shared_subscription_splits_the_readings_between_bridges(broker: Broker, tmp_path: Path) -> None:
    shared = "$share/fmi-bridge/FCTS/FAE/+/SolvExtract/#"
    pair = []
    for n in (1, 2):  # each with its own folder: its own spool and its own log
        (tmp_path / f"bridge-{n}").mkdir()
        env = {**LOCAL_ONLY, "MQTT_PORT": str(broker.port), "MQTT_TOPIC": shared, "MQTT_CLIENT_ID": f"bridge-{n}"}
        pair.append(Bridge(tmp_path / f"bridge-{n}", env).start())
    try:
        for bridge in pair:
            bridge.wait_ready()
        messages = readings(["MOR", "BAG"], 100)

        publish(broker.port, messages)

        def logged() -> list[str]:
            return [e["event_id"] for b in pair for e in b.log_entries() if e.get("message") == "reading"]

        # Accepted counts the spool commit; the log line comes later, from the sender: wait for the lines.
        wait_until(lambda: len(logged()) >= len(messages), 30, "every reading logged")
        assert all(b.metric("fmi_bridge_messages_accepted_total") > 0 for b in pair)  # each took a share
        assert sum(b.metric("fmi_bridge_messages_accepted_total") for b in pair) == len(messages)
        assert sorted(logged()) == sorted(expected_ids(messages))  # each reading once, in one bridge or the other
    finally:
        for bridge in pair:
            bridge.stop()


def test_a_connection_lost_again_and_again_is_a_warning_one_loss_is_not(
    broker: Broker, bridges: Callable[..., Bridge]
) -> None:
    """Another client with the bridge's client id (LOCAL and DEV bind no id to a login) takes the session each
    time it connects: the bridge reconnects and loses it again. One loss is a broker restart; three in a minute
    are a fault an operator must see: an ERROR naming MQTT_CLIENT_ID, and readiness saying so. A normal stop
    after it reads as one."""
    bridge = bridges({**LOCAL_ONLY, "MQTT_PORT": str(broker.port), "MQTT_CLIENT_ID": "bridge-id"}).start()
    bridge.wait_ready()
    for taken in range(1, 4):
        borrower = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bridge-id", protocol=mqtt.MQTTv5)
        borrower.connect("127.0.0.1", broker.port)
        borrower.loop(timeout=0.5)
        borrower.disconnect()
        wait_until(lambda n=taken: bridge.metric("fmi_bridge_mqtt_disconnects_total") >= n, 10, f"loss {taken}")
        wait_until(lambda n=taken: bridge.metric("fmi_bridge_mqtt_connects_total") > n, 10, "its session taken back")
    losses = [e for e in bridge.log_entries() if e.get("message") == "disconnected from broker"]
    assert [e["severity"] for e in losses] == ["INFO", "INFO", "WARNING"]
    assert {e["reason"] for e in losses} == {"the broker closed the connection without a DISCONNECT packet"}
    errors = [e for e in bridge.log_entries() if e.get("severity") == "ERROR"]
    assert [e["message"] for e in errors] == ["another client keeps taking the bridge's session"]
    assert "MQTT_CLIENT_ID" in errors[0]["action"] and errors[0]["client_id"] == "bridge-id"
    status, body = bridge.status("/readiness_check")
    assert status == 503 and "client id 'bridge-id'" in body

    assert bridge.terminate() == 0
    last = [e for e in bridge.log_entries() if e.get("message") == "disconnected from broker"][-1]
    assert last["reason"] == "the bridge is stopping" and last["severity"] == "INFO"
    assert "Unspecified error" not in bridge.output()


def test_two_bridges_with_one_client_id_each_say_so(broker: Broker, tmp_path: Path) -> None:
    """Each knocks the other off the broker about once a second, for ever: both name the setting to change."""
    pair = []
    for n in (1, 2):  # each with its own folder (spool, log) and ports, one client id
        (tmp_path / f"bridge-{n}").mkdir()
        pair.append(
            Bridge(tmp_path / f"bridge-{n}", {**LOCAL_ONLY, "MQTT_PORT": str(broker.port), "MQTT_CLIENT_ID": "one-id"})
        )
    try:
        for bridge in pair:
            bridge.start()

        def said(bridge: Bridge) -> list[dict[str, Any]]:
            return [
                e
                for e in bridge.log_entries()
                if e.get("message") == "another client keeps taking the bridge's session"
            ]

        for bridge in pair:
            wait_until(lambda b=bridge: said(b), 60, "the ERROR")
            assert len(said(bridge)) == 1 and "MQTT_CLIENT_ID" in said(bridge)[0]["action"]
            wait_until(lambda b=bridge: "client id 'one-id'" in b.status("/readiness_check")[1], 10, "readiness")
    finally:
        for bridge in pair:
            bridge.stop()


def test_a_burst_the_broker_sends_at_once_is_taken_without_waiting_for_more_traffic(
    broker: Broker, bridges: Callable[..., Bridge]
) -> None:
    # The link reads the socket in 64 KiB blocks and parses a bounded number of packets a turn; the packets left
    # in the block are invisible to select(). Queued while the bridge is away, 3,000 readings come as one burst of
    # Receive Maximum (1,000) on the resumed session, several turns' worth a block; then nothing else arrives.
    bridge = subscribed_local_bridge(broker, bridges)
    assert bridge.terminate() == 0
    sent = readings(["MOR", "BAG", "CHU"], 1000)
    publish(broker.port, sent)

    bridge.start()
    wait_until(lambda: bridge.metric("fmi_bridge_mqtt_connects_total") == 1, 30, "the session resumed")
    connected = time.monotonic()
    # A loop that waited on select() with packets left in the block stalled until the next bytes came, which
    # with nothing more published is the next keepalive: this wait ran out (seen before the loop asked).
    wait_until(lambda: bridge.metric("fmi_bridge_messages_accepted_total") == len(sent), 30, "every reading taken")
    print(
        f"\nburst of {len(sent)} queued readings taken {time.monotonic() - connected:.2f} s after the session resumed"
    )
    assert bridge.metric("fmi_bridge_mqtt_disconnects_total") == 0


def test_readings_larger_than_one_read_of_the_socket_arrive_whole(
    broker: Broker, bridges: Callable[..., Bridge]
) -> None:
    # Payloads of 60 KiB: most packets begin in one 64 KiB block and end in the next, two packets share a block.
    bridge = subscribed_local_bridge(broker, bridges)
    large = []
    for seq in range(40):
        body = json.loads(reading("MOR", seq).payload)
        body["note"] = "x" * (60 * 1024 - 200 + seq)  # each a different length: every split point moves
        large.append(Published(reading("MOR", seq).topic, json.dumps(body).encode()))
    publish(broker.port, large)

    wait_until(lambda: bridge.metric("fmi_bridge_messages_accepted_total") == len(large), 30, "every reading taken")
    assert bridge.metric("fmi_bridge_messages_rejected_total") == 0
    # The event id is a hash of topic and payload: equal ids mean every byte arrived as it was sent.
    wait_until(lambda: len(logged_ids(bridge)) == len(large), 30, "every reading logged")
    assert logged_ids(bridge) == expected_ids(large)


def subscribed_local_bridge(broker: Broker, bridges: Callable[..., Bridge]) -> Bridge:
    bridge = bridges({**LOCAL_ONLY, "MQTT_PORT": str(broker.port)}).start()
    bridge.wait_ready()
    wait_until(lambda: "subscribed" in bridge.output(), 30, "the subscription")
    return bridge


def logged_ids(bridge: Bridge) -> set[str]:
    return {str(entry["event_id"]) for entry in bridge.log_entries() if entry.get("message") == "reading"}
