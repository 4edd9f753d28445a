"""What a Reading or a Reject becomes downstream: the BigQuery rows and the Pub/Sub KPI event.

The spool stores the BigQuery row as JSON; the KPI event is derived from it, so both sinks see the same facts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fmi_bridge.json_text import compact
from fmi_bridge.readings import Reading, Reject

SCHEMA_VERSION = 1
KPI_FIELDS = ("event_id", "site_code", "pi_tag", "sensor_id", "value", "timestamp", "received_at", "mqtt_topic")
_ROW_START = '{"event_id":"'
_PAYLOAD_KEY = ',"payload":'
_SITE_KEY = ',"site_code":"'
_PI_TAG_KEY = ',"pi_tag":"'
_KPI_END = f',"schema_version":{SCHEMA_VERSION}}}'
# The json module's own string scanner (C): a JSON string from just past its opening quote, and where it ends.
scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def rfc3339(moment: datetime) -> str:
    """UTC with microseconds and a Z, the form BigQuery and most consumers parse without help.

    Fields padded by %-formatting, not strftime: glibc's %Y writes year 999 as "999", which is not RFC 3339. Equal
    to isoformat(timespec="microseconds") of the UTC time with a Z, at two thirds of its cost (two a reading).
    """
    utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031  # faster than an f-string or str.format
        utc.year,
        utc.month,
        utc.day,
        utc.hour,
        utc.minute,
        utc.second,
        utc.microsecond,
    )


def reading_row(reading: Reading) -> dict[str, Any]:
    return {
        "event_id": reading.event_id,
        "site_code": reading.site_code,
        "pi_tag": reading.pi_tag,
        "sensor_id": reading.sensor_id,
        "value": reading.value,
        "timestamp": rfc3339(reading.timestamp),
        "received_at": rfc3339(reading.received_at),
        "mqtt_topic": reading.mqtt_topic,
        "payload": reading.payload,
    }


def reject_row(reject: Reject) -> dict[str, Any]:
    """Always encodable: whatever a rejected message carried, its reject row must reach the spool."""
    return {
        "reject_id": reject_id_for(reject),
        "received_at": rfc3339(reject.received_at),
        "mqtt_topic": _encodable(reject.mqtt_topic),
        "payload": _encodable(reject.payload),
        "reason": reject.reason,
        "detail": _encodable(reject.detail),
        "event_id": reject.event_id,
    }


def _encodable(text: str) -> str:
    """Lone surrogates written as \\udXXX escapes, so the text encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def reject_id_for(reject: Reject) -> str:
    """Stable per message and reason, so a redelivered reject is deduplicated like a reading."""
    key = "\x00".join((reject.mqtt_topic, reject.payload, reject.reason, reject.event_id or ""))
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def dead_letter_row(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    """A reading a sink refused for good, as a rejects-table row that keeps its event_id."""
    reject = Reject(
        reason, detail, row["mqtt_topic"], row["payload"], datetime.fromisoformat(row["received_at"]), row["event_id"]
    )
    return reject_row(reject)


def kpi_event(row: dict[str, Any]) -> dict[str, Any]:
    event = {name: row[name] for name in KPI_FIELDS}
    event["schema_version"] = SCHEMA_VERSION
    return event


def kpi_message(row: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Pub/Sub data and attributes; the ordering key is the site_code."""
    data = compact(kpi_event(row)).encode("utf-8")
    attributes = {"site_code": row["site_code"], "pi_tag": row["pi_tag"], "event_id": row["event_id"]}
    return data, attributes


def kpi_message_of_body(body: str) -> tuple[bytes, dict[str, str]]:
    """kpi_message of the reading row stored as `body`, cut from the text instead of decoding and encoding it again
    (a third of building a Publish request). The stored text is reading_row's compact JSON: the KPI event's fields
    in its order, then the payload. A quote inside a JSON string is always escaped, so the first `,"payload":` is
    the key itself. Same bytes as kpi_message(json.loads(body)), which tests/test_fuzz.py holds; a text of another
    shape is decoded."""
    cut = body.find(_PAYLOAD_KEY)
    site = body.find(_SITE_KEY)
    tag = body.find(_PI_TAG_KEY)
    if not (body.startswith(_ROW_START) and 0 < site < tag < cut):
        return kpi_message(json.loads(body))
    event_id, _ = scanstring(body, len(_ROW_START))
    site_code, _ = scanstring(body, site + len(_SITE_KEY))
    pi_tag, _ = scanstring(body, tag + len(_PI_TAG_KEY))
    data = (body[:cut] + _KPI_END).encode("utf-8")
    return data, {"site_code": site_code, "pi_tag": pi_tag, "event_id": event_id}
