"""The packet around the payload: whatever MQTT 5 properties a PUBLISH carries through a real Mosquitto, the
bridge keeps its connection and every message it is sent ends as a reading or a reject."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import LOCAL_ONLY, Bridge, Broker, mosquitto_pub, publish, reading, readings, wait_until

pytestmark = pytest.mark.slow


def local_bridge(bridges: Callable[..., Bridge], broker: Broker) -> Bridge:
    bridge = bridges({**LOCAL_ONLY, "MQTT_PORT": str(broker.port)}).start()
    bridge.wait_ready()
    return bridge


def settled(bridge: Bridge, received: int) -> None:
    """Wait until the bridge received `received` messages and each became a reading or a reject."""
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") >= received, 30, f"{received} received")
    wait_until(
        lambda: (
            bridge.metric("fmi_bridge_messages_accepted_total") + bridge.metric("fmi_bridge_messages_rejected_total")
            == bridge.metric("fmi_bridge_messages_received_total")
        ),
        30,
        "each message a reading or a reject",
    )


def test_a_byte_order_mark_in_a_user_property_stops_nothing(broker: Broker, bridges: Callable[..., Bridge]) -> None:
    """The reading from the report: U+FEFF in a user property, then five readings of another site."""
    bridge = local_bridge(bridges, broker)
    marked = reading("BOM", 1)
    sent = mosquitto_pub(
        broker.port, marked.topic, marked.payload, "-V", "5", "-D", "publish", "user-property", "note", "\ufeff"
    )
    assert sent.returncode == 0, sent.stderr
    publish(broker.port, readings(["MOR"], 5))

    settled(bridge, 6)
    assert bridge.metric("fmi_bridge_messages_accepted_total") == 6
    assert bridge.metric("fmi_bridge_mqtt_disconnects_total") == 0
    assert bridge.metric("fmi_bridge_mqtt_connects_total") == 1
    assert bridge.metric("fmi_bridge_mqtt_properties_skipped") == 1
    logged = {e.get("site_code") for e in bridge.log_entries() if e.get("message") == "reading"}
    assert logged == {"BOM", "MOR"}


# -- the packet-level fuzz ---------------------------------------------------------------------------------

ODD_TEXT: dict[str, str | bytes] = {
    "byte order mark": "\ufeff",
    "marks around text": "\ufeffx\ufeff",
    "noncharacter U+FFFF": "\uffff",
    "last code point U+10FFFF": "\U0010ffff",
    "control U+0001": "\u0001",
    "delete U+007F": "\u007f",
    "C1 control U+0085": "\u0085",
    "mixed scripts and emoji": "é日本🎉",
    "empty": "",
    "longest the packet allows": "x" * 65535,
    "not UTF-8 (0xFF)": b"\xff\xfe",
    "overlong NUL": b"\xc0\x80",
    "encoded surrogate": b"\xed\xa0\x80",
    "NUL": "\u0000",
}


def cases() -> list[tuple[str, dict[str, Any], int, bool]]:
    """(name, PUBLISH properties, QoS, retain) for every property a client may send, at odd and edge values."""
    made: list[tuple[str, dict[str, Any], int, bool]] = []
    for label, text in ODD_TEXT.items():
        made.append((f"content type: {label}", {"ContentType": text}, 1, False))
        made.append((f"response topic: {label}", {"ResponseTopic": text or "r"}, 1, False))
        made.append((f"user property value: {label}", {"UserProperty": [("k", text)]}, 1, False))
        made.append((f"user property key: {label}", {"UserProperty": [(text, "v")]}, 1, False))
    made += [
        ("1,000 user properties", {"UserProperty": [(f"k{n}", "v") for n in range(1000)]}, 1, False),
        ("correlation data, binary", {"CorrelationData": bytes(range(256)) * 4}, 1, False),
        ("correlation data, longest", {"CorrelationData": b"\x00" * 65535}, 1, False),
        ("payload format 1 (UTF-8 declared)", {"PayloadFormatIndicator": 1}, 1, False),
        ("payload format 1, payload not UTF-8", {"PayloadFormatIndicator": 1, "payload": b"\xff{}"}, 1, False),
        ("payload format 0", {"PayloadFormatIndicator": 0}, 1, False),
        ("message expiry 0", {"MessageExpiryInterval": 0}, 1, False),
        ("message expiry 1", {"MessageExpiryInterval": 1}, 1, False),
        ("message expiry largest", {"MessageExpiryInterval": 2**32 - 1}, 1, False),
        ("topic alias 1", {"TopicAlias": 1}, 1, False),
        (
            "every property at once",
            {
                "ContentType": "\ufeff",
                "ResponseTopic": "\ufeff",
                "CorrelationData": b"\xff",
                "UserProperty": [("\ufeff", "\ufeff")],
                "MessageExpiryInterval": 60,
            },
            1,
            False,
        ),
        ("QoS 0 with a marked property", {"UserProperty": [("k", "\ufeff")]}, 0, False),
        ("QoS 2 with a marked property", {"UserProperty": [("k", "\ufeff")]}, 2, False),
        ("retained, marked", {"UserProperty": [("k", "\ufeff")]}, 1, True),
    ]
    return made


@dataclass
class Outcome:
    sent: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # case → what the broker did


def send_case(port: int, seq: int, name: str, props: dict[str, Any], qos: int, retain: bool, outcome: Outcome) -> None:
    """One case on a connection of its own: the broker may refuse it by a reason code or by disconnecting."""
    message = reading("FZ", seq)
    payload = props.pop("payload", message.payload)
    properties = Properties(PacketTypes.PUBLISH)
    for key, value in props.items():
        setattr(properties, key, value)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-{seq}", protocol=mqtt.MQTTv5)
    answers: list[str] = []
    gone: list[str] = []
    client.on_publish = lambda c, userdata, mid, reason, p: answers.append(str(reason))
    client.on_disconnect = lambda c, userdata, flags, reason, p: gone.append(str(reason))
    client.connect("127.0.0.1", port, keepalive=10)
    try:
        client.publish(message.topic, payload, qos=qos, retain=retain, properties=properties)
        outcome.sent += 1
        # QoS 0 has no acknowledgement: its refusal, a disconnect, gets the same moment as the others' answers
        deadline = time.monotonic() + (0.3 if qos == 0 else 5)
        while time.monotonic() < deadline and not gone and (qos == 0 or not answers):
            client.loop(timeout=0.02)
        if gone:
            outcome.refused[name] = f"disconnected: {gone[0]}"
        elif answers and answers[0] != "Success":
            outcome.refused[name] = f"reason code: {answers[0]}"
        elif qos and not answers:
            outcome.refused[name] = "no acknowledgement"
    finally:
        client.disconnect()


def test_publish_properties_at_every_edge_neither_disconnect_nor_lose(
    broker: Broker, bridges: Callable[..., Bridge]
) -> None:
    bridge = local_bridge(bridges, broker)
    outcome = Outcome()
    for seq, (name, props, qos, retain) in enumerate(cases()):
        send_case(broker.port, seq, name, dict(props), qos, retain, outcome)
    delivered = outcome.sent - len(outcome.refused)
    publish(broker.port, readings(["MOR"], 5))  # and the sites after them still get through

    settled(bridge, delivered + 5)
    time.sleep(1)  # nothing more arrives than the broker forwarded
    figures = {
        "packets_sent": outcome.sent,
        "refused_by_broker": len(outcome.refused),
        "received": bridge.metric("fmi_bridge_messages_received_total"),
        "readings": bridge.metric("fmi_bridge_messages_accepted_total"),
        "rejects": bridge.metric("fmi_bridge_messages_rejected_total"),
        "disconnects": bridge.metric("fmi_bridge_mqtt_disconnects_total"),
        "properties_skipped": bridge.metric("fmi_bridge_mqtt_properties_skipped"),
    }
    print(json.dumps({"figures": figures, "refused": outcome.refused}, indent=1, ensure_ascii=True))
    assert figures["received"] == delivered + 5
    assert figures["readings"] + figures["rejects"] == figures["received"]
    assert figures["disconnects"] == 0 and bridge.metric("fmi_bridge_mqtt_connects_total") == 1
    assert figures["properties_skipped"] > 0  # the marked properties paho alone would have refused
