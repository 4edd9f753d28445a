"""The bridge's PUBLISH decoder against paho's own: whatever the packet, the message it yields is the one paho's
parser yields (its fast path for a PUBLISH without properties included), and no packet paho refuses gets
through the fast path."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fmi_bridge.mqtt import publish_decoder

MQTT5 = MQTTProtocolVersion.MQTTv5


def encoded_properties(expiry: int | None, user: list[tuple[str, str]]) -> bytes:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if expiry is not None:
        properties.MessageExpiryInterval = expiry
    for pair in user:
        properties.UserProperty = pair
    packed: bytes = properties.pack()  # type: ignore[no-untyped-call]
    return packed


publishes = st.builds(
    lambda topic, qos, dup, retain, mid, properties, payload: (
        0x30 | dup << 3 | qos << 1 | retain,
        struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + properties + payload,
    ),
    topic=st.binary(max_size=300),
    qos=st.integers(0, 2),
    dup=st.integers(0, 1),
    retain=st.integers(0, 1),
    mid=st.integers(1, 65535),
    properties=st.one_of(
        st.just(b"\x00"),  # no property: the fast path
        st.binary(min_size=1, max_size=8),  # a length and bytes, whatever they say
        st.builds(
            encoded_properties,
            st.none() | st.integers(0, 2**32 - 1),
            st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=3),
        ),
    ),
    payload=st.binary(max_size=2000),
)


def paho_or_skipped(header: int, packet: bytes) -> Any:
    """What the bridge promises: paho's message, or when paho refuses the properties (a NUL in a string, a
    property it does not know), the message with its properties skipped by their declared length."""
    try:
        return publish_decoder._paho_decode_publish(header, packet, MQTT5)
    except (MQTTException, UnicodeDecodeError, KeyError, IndexError, struct.error):
        return publish_decoder._without_properties(header, packet)


def outcome(decode: Callable[[], Any]) -> tuple[Any, ...] | str:
    try:
        return fields(decode())
    except MalformedPacket as exc:
        return f"refused: {exc}"


def fields(packet: Any) -> tuple[Any, ...]:
    return (packet.dup, packet.qos, packet.retain, packet.topic, packet.mid, packet.payload, str(packet.properties))


@settings(max_examples=1000, deadline=None)
@given(publishes)
def test_every_publish_decodes_to_the_message_paho_decodes(publish: tuple[int, bytes]) -> None:
    header, packet = publish
    ours = outcome(lambda: publish_decoder.decode_publish(header, packet, MQTT5))
    assert ours == outcome(lambda: paho_or_skipped(header, packet))
    if not isinstance(ours, str):
        decoded = publish_decoder.decode_publish(header, packet, MQTT5)
        assert type(decoded.topic) is bytes and type(decoded.payload) is bytes  # as paho's struct.unpack makes them


@settings(max_examples=1000, deadline=None)
@given(publishes, st.integers(0, 2400), st.binary(max_size=4))
def test_the_fast_path_takes_no_packet_paho_refuses(publish: tuple[int, bytes], cut: int, tail: bytes) -> None:
    header, packet = publish
    damaged = packet[:cut] + tail  # cut short, or with stray bytes where the lengths are
    fast = publish_decoder._without_any_property(header, damaged)
    if fast is None:
        return
    assert fields(fast) == fields(publish_decoder._paho_decode_publish(header, damaged, MQTT5))


def test_an_empty_properties_of_one_message_is_not_another_message_s() -> None:
    packet = struct.pack("!H", 3) + b"a/b" + struct.pack("!H", 7) + b"\x00" + b"{}"
    first = publish_decoder.decode_publish(0x32, packet, MQTT5)
    second = publish_decoder.decode_publish(0x32, packet, MQTT5)
    first.properties.UserProperty = ("set", "on the first")
    assert not hasattr(second.properties, "UserProperty")
    assert not hasattr(Properties(PacketTypes.PUBLISH), "UserProperty")  # type: ignore[no-untyped-call]
    assert str(second.properties) == str(Properties(PacketTypes.PUBLISH))  # type: ignore[no-untyped-call]
