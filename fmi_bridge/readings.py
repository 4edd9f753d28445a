"""Topic parsing and strict payload validation: an MQTT message becomes a Reading or a Reject, never an exception."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fmi_bridge.partition_window import PartitionWindow
from fmi_bridge.sinks.pubsub_limits import MAX_ATTRIBUTE_VALUE_BYTES, MAX_ORDERING_KEY_BYTES, too_long

MAX_PAYLOAD_BYTES = 64 * 1024
TOPIC_LEVELS = ("FCTS", "FAE", None, "SolvExtract", None)  # None: the site and pi_tag levels

# Reject reason codes: a fixed set, so dashboards and the rejects table can group by them.
BAD_TOPIC = "bad_topic"
PAYLOAD_TOO_LARGE = "payload_too_large"
BAD_ENCODING = "bad_encoding"
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
BAD_SITE_CODE = "bad_site_code"
SITE_MISMATCH = "site_mismatch"
BAD_SENSOR_ID = "bad_sensor_id"
BAD_TIMESTAMP = "bad_timestamp"
TIMESTAMP_OUT_OF_WINDOW = "timestamp_out_of_window"  # BigQuery would refuse it: fmi_bridge/partition_window.py
BAD_VALUE = "bad_value"
# The site becomes the Pub/Sub ordering key and an attribute, pi_tag an attribute: a topic level longer than
# Pub/Sub takes is refused there for good, so it is a reject at intake (limits: fmi_bridge/sinks/pubsub_limits.py).
SITE_CODE_TOO_LONG = "site_code_too_long"
PI_TAG_TOO_LONG = "pi_tag_too_long"
UNPROCESSABLE = "unprocessable"  # passed validation, yet turning it into a record failed: kept, never fatal
REASONS = (
    BAD_TOPIC,
    PAYLOAD_TOO_LARGE,
    BAD_ENCODING,
    BAD_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    BAD_SITE_CODE,
    SITE_MISMATCH,
    BAD_SENSOR_ID,
    BAD_TIMESTAMP,
    TIMESTAMP_OUT_OF_WINDOW,
    BAD_VALUE,
    SITE_CODE_TOO_LONG,
    PI_TAG_TOO_LONG,
    UNPROCESSABLE,
)
GOOGLE_WINDOW = PartitionWindow()
REQUIRED_FIELDS = ("site_code", "sensor_id", "timestamp", "value")
# ISO 8601 extended form with a zone of whole minutes (RFC 3339 and its common relatives); Python alone would
# also take offsets with seconds and compact forms, which no sensor gateway sends on purpose.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}(:?\d{2})?)")


@dataclass(frozen=True)
class Inbound:
    """An MQTT message as the rest of the bridge sees it; paho's types stop at the callback."""

    topic: str
    payload: bytes
    received_at: datetime
    qos: int = 1
    mid: int = 0
    generation: int = 0  # the broker connection it arrived on: acks go only to that connection


@dataclass(frozen=True)
class Reading:
    event_id: str
    site_code: str
    pi_tag: str
    sensor_id: str
    value: float
    timestamp: datetime
    received_at: datetime
    mqtt_topic: str
    payload: str


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str
    mqtt_topic: str
    payload: str
    received_at: datetime
    event_id: str | None = None


class _RejectError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def event_id_for(topic: str, payload: bytes) -> str:
    """Same topic and payload, same id: a redelivered message keeps its identity downstream."""
    digest = hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\x00" + payload)
    return digest.hexdigest()[:32]


def parse_topic(topic: str) -> tuple[str, str]:
    """Return (site, pi_tag) of `FCTS/FAE/<site>/SolvExtract/<pi_tag>`."""
    levels = topic.split("/")
    if len(levels) != len(TOPIC_LEVELS):
        raise _RejectError(BAD_TOPIC, f"expected 5 levels FCTS/FAE/<site>/SolvExtract/<pi_tag>, got {len(levels)}")
    for level, expected in zip(levels, TOPIC_LEVELS, strict=True):
        if expected is not None and level != expected:
            raise _RejectError(BAD_TOPIC, f"level {level!r} should be {expected!r}")
    site, pi_tag = levels[2], levels[4]
    if not site or not pi_tag:
        raise _RejectError(BAD_TOPIC, "site and pi_tag levels must not be empty")
    site_limit = min(MAX_ORDERING_KEY_BYTES, MAX_ATTRIBUTE_VALUE_BYTES)
    if detail := too_long("site_code", site, site_limit, "an ordering key and an attribute value"):
        raise _RejectError(SITE_CODE_TOO_LONG, detail)
    if detail := too_long("pi_tag", pi_tag, MAX_ATTRIBUTE_VALUE_BYTES, "an attribute value"):
        raise _RejectError(PI_TAG_TOO_LONG, detail)
    return site, pi_tag


def _reject_constant(token: str) -> Any:
    raise _RejectError(BAD_JSON, f"{token} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _RejectError(BAD_JSON, f"duplicate key {duplicate!r}")
    return result


# One decoder for every message: json.loads with options builds a new one on each call.
_JSON = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _decode(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _RejectError(PAYLOAD_TOO_LARGE, f"{len(payload)} bytes, at most {MAX_PAYLOAD_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _RejectError(BAD_ENCODING, f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        document = _JSON.decode(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError and Python's int-size limit are ValueErrors; deep nesting is a RecursionError.
        detail = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise _RejectError(BAD_JSON, detail[:200]) from None
    if not isinstance(document, dict):
        raise _RejectError(NOT_AN_OBJECT, f"payload is a JSON {type(document).__name__}, expected an object")
    missing = [name for name in REQUIRED_FIELDS if name not in document]
    if missing:
        raise _RejectError(MISSING_FIELD, f"missing {', '.join(missing)}")
    return document


def _non_empty_string(document: dict[str, Any], name: str, reason: str) -> str:
    value = document[name]
    if not isinstance(value, str) or not value.strip():
        raise _RejectError(reason, f"{name} must be a non-empty string")
    surrogate = _LONE_SURROGATE.search(value)
    if surrogate:
        # A JSON escape such as \ud800 decodes to a lone surrogate: not Unicode, so no UTF-8 sink could take it.
        raise _RejectError(
            BAD_ENCODING, f"{name} holds a lone UTF-16 surrogate U+{ord(surrogate.group()):04X} at {surrogate.start()}"
        )
    return value


def parse_timestamp(value: object) -> datetime:
    """An RFC 3339 / ISO 8601 string with a timezone, normalised to UTC."""
    if not isinstance(value, str):
        raise _RejectError(BAD_TIMESTAMP, "timestamp must be an ISO 8601 string")
    if not _TIMESTAMP.fullmatch(value):
        raise _RejectError(BAD_TIMESTAMP, f"timestamp {value[:64]!r} is not ISO 8601 with a timezone")
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        raise _RejectError(BAD_TIMESTAMP, f"timestamp {value[:64]!r} is not ISO 8601") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise _RejectError(BAD_TIMESTAMP, f"timestamp {value[:64]!r} has no timezone")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise _RejectError(BAD_TIMESTAMP, f"timestamp {value[:64]!r} is out of range in UTC") from None


def _finite_number(value: object) -> float:
    # bool is an int in Python, but true/false is not a sensor value.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _RejectError(BAD_VALUE, f"value must be a JSON number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise _RejectError(BAD_VALUE, "value is too large for a 64-bit float") from None
    if not math.isfinite(number):
        raise _RejectError(BAD_VALUE, "value must be finite")
    return number


def payload_text(payload: bytes) -> str:
    """Payload as text for the audit tables: bytes that are not UTF-8 are escaped, an oversized one truncated."""
    return payload[:MAX_PAYLOAD_BYTES].decode("utf-8", "backslashreplace")


def validate(message: Inbound, window: PartitionWindow = GOOGLE_WINDOW) -> Reading | Reject:
    """Parse the topic and validate the payload; any problem becomes a Reject with a reason code. `window`:
    the reading times BigQuery takes, relative to the message's arrival."""
    try:
        site, pi_tag = parse_topic(message.topic)
        document = _decode(message.payload)
        site_code = _non_empty_string(document, "site_code", BAD_SITE_CODE)
        if site_code != site:
            raise _RejectError(SITE_MISMATCH, f"site_code {site_code[:64]!r} differs from topic site {site[:64]!r}")
        sensor_id = _non_empty_string(document, "sensor_id", BAD_SENSOR_ID)
        timestamp = parse_timestamp(document["timestamp"])
        if detail := window.refuses(timestamp, message.received_at):
            raise _RejectError(TIMESTAMP_OUT_OF_WINDOW, detail)
        value = _finite_number(document["value"])
    except _RejectError as invalid:
        return Reject(invalid.reason, invalid.detail, message.topic, payload_text(message.payload), message.received_at)
    return Reading(
        event_id=event_id_for(message.topic, message.payload),
        site_code=site_code,
        pi_tag=pi_tag,
        sensor_id=sensor_id,
        value=value,
        timestamp=timestamp,
        received_at=message.received_at,
        mqtt_topic=message.topic,
        payload=message.payload.decode("utf-8"),
    )
