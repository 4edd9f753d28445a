"""PUBLISH packets whose MQTT 5 properties paho cannot parse still deliver their message.

paho-mqtt 2.2.0 (pinned in requirements.txt) refuses a PUBLISH whose properties it cannot parse with
MalformedPacket, and drops the connection: for instance U+FEFF in any UTF-8 property (`readUTF` in
paho/mqtt/properties.py), which MQTT 5.0 section 1.5.4 allows ("MUST NOT be skipped over or stripped off by a
packet receiver") and Mosquitto forwards. The broker then sends the same message first after every reconnect,
and no site's reading gets through. A reading is the topic and the payload; the bridge reads no PUBLISH
property. So this decoder parses the properties as paho does and, when that fails, skips them by their declared
length (a Variable Byte Integer, section 2.2.2.2) and delivers the message with none. A fault in the topic,
packet id or property length is still MalformedPacket, as before.

The fix sits at paho's one PUBLISH parser (`paho.mqtt._packet.decode_publish`, called by the client through the
module); `install()` checks that paho still has it, so a paho upgrade that moves it fails at start, not silently.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

import paho.mqtt._packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

log = logging.getLogger(__name__)

_paho_decode_publish = paho_packet.decode_publish


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self.lock = threading.Lock()


_skipped = _Counter()


def properties_skipped() -> int:
    """PUBLISH packets delivered without their properties since start (a metric)."""
    return _skipped.value


# An empty PUBLISH Properties, whose attributes each message's empty one copies (see _no_properties).
_EMPTY_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    if protocol == MQTTProtocolVersion.MQTTv5 and (bare := _without_any_property(header, packet)) is not None:
        return bare
    try:
        return _paho_decode_publish(header, packet, protocol)
    except (MQTTException, UnicodeDecodeError, KeyError, IndexError, struct.error) as exc:
        if protocol != MQTTProtocolVersion.MQTTv5:
            raise
        result = _without_properties(header, bytes(packet))
        _count(exc)
        return result


def _without_any_property(header: int, packet: bytes | bytearray) -> Any:
    """The usual reading, a PUBLISH with a property length of 0, decoded as paho decodes it (equal fields, its own
    empty Properties), but at a fraction of the cost: None for any other packet, which paho parses."""
    if len(packet) < 3:
        return None
    end_of_topic = 2 + ((packet[0] << 8) | packet[1])
    qos = (header & 0x06) >> 1
    lengths_at = end_of_topic + 2 if qos else end_of_topic  # the packet id (section 3.3.2.2) only at QoS 1 and 2
    if len(packet) <= lengths_at or packet[lengths_at] != 0:
        return None
    return paho_packet.PublishPacket(
        dup=((header & 0x08) >> 3) != 0,
        qos=qos,
        retain=(header & 0x01) != 0,
        topic=bytes(packet[2:end_of_topic]),
        mid=(packet[end_of_topic] << 8) | packet[end_of_topic + 1] if qos else 0,
        properties=_no_properties(),
        payload=bytes(packet[lengths_at + 1 :]),
    )


def _no_properties() -> Properties:
    """A new empty PUBLISH Properties without paho's constructor, which builds its three lookup tables (the names,
    the types, the packets each property may be in) anew for every message: paho's decode took 18 µs a message,
    this one 2.4 (docs/performance.md). The tables are shared with one made at import; an instance only reads
    them (a property set on it becomes an attribute of its own)."""
    empty: Properties = object.__new__(Properties)
    empty.__dict__.update(_EMPTY_PROPERTIES.__dict__)
    return empty


def _without_properties(header: int, packet: bytes) -> Any:
    """The packet as paho decodes it, properties skipped by their declared length (MalformedPacket if the
    packet is not a PUBLISH at all)."""
    try:
        (length,) = struct.unpack_from("!H", packet)
        topic = packet[2 : 2 + length]
        rest = packet[2 + length :]
        qos = (header & 0x06) >> 1
        mid = 0
        if qos > 0:
            (mid,) = struct.unpack_from("!H", rest)
            rest = rest[2:]
        props_len, vbi_len = VariableByteIntegers.decode(rest)  # type: ignore[no-untyped-call]  # paho: untyped
    except (struct.error, IndexError) as exc:
        raise MalformedPacket(f"PUBLISH cut short: {exc}") from None
    if len(topic) != length or vbi_len + props_len > len(rest):
        raise MalformedPacket("PUBLISH shorter than its topic or properties")
    return paho_packet.PublishPacket(
        dup=((header & 0x08) >> 3) != 0,
        qos=qos,
        retain=(header & 0x01) != 0,
        topic=topic,
        mid=mid,
        properties=Properties(PacketTypes.PUBLISH),  # type: ignore[no-untyped-call]  # paho leaves it untyped
        payload=rest[vbi_len + props_len :],
    )


def _count(exc: Exception) -> None:
    with _skipped.lock:
        _skipped.value += 1
        first = _skipped.value == 1
    if first:  # one line; the metric counts the rest
        log.info("a message's MQTT 5 properties could not be parsed; delivered without them", extra={"error": str(exc)})


def install() -> None:
    if getattr(paho_packet, "decode_publish", None) is None or not hasattr(paho_packet, "PublishPacket"):
        raise RuntimeError("paho-mqtt has no _packet.decode_publish: check requirements.txt's pinned version")
    paho_packet.decode_publish = decode_publish
