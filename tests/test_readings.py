"""Topic parsing and payload validation: examples for each rule, and properties over generated input."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmi_bridge import readings as r
from fmi_bridge.partition_window import PartitionWindow
from fmi_bridge.readings import Inbound, Reading, Reject, validate

NOW = datetime(2026, 11, 22, tzinfo=UTC)
TOPIC = "FCTS/FAE/MOR/SolvExtract/PI.FT101"
GOOD = {"site_code": "MOR", "sensor_id": "FT-101", "timestamp": "2026-11-20T08:15:30Z", "value": 1.5}


def check(topic: str = TOPIC, payload: bytes | dict | str = GOOD) -> Reading | Reject:
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return validate(Inbound(topic, payload, NOW))


def reason_of(outcome: Reading | Reject) -> str:
    assert isinstance(outcome, Reject), outcome
    return outcome.reason


def test_a_good_reading() -> None:
    outcome = check()
    assert isinstance(outcome, Reading)
    assert (outcome.site_code, outcome.pi_tag, outcome.sensor_id, outcome.value) == ("MOR", "PI.FT101", "FT-101", 1.5)
    assert outcome.timestamp == datetime(2026, 11, 20, 8, 15, 30, tzinfo=UTC)
    assert outcome.payload == json.dumps(GOOD)


@pytest.mark.parametrize(
    "topic",
    [
        "FCTS/FAE/MOR/SolvExtract",
        "FCTS/FAE/MOR/SolvExtract/T/extra",
        "fcts/FAE/MOR/SolvExtract/T",
        "FCTS/FAX/MOR/SolvExtract/T",
        "FCTS/FAE/MOR/Other/T",
        "FCTS/FAE//SolvExtract/T",
        "FCTS/FAE/MOR/SolvExtract/",
        "",
        "/FCTS/FAE/MOR/SolvExtract/T",
    ],
)
def test_bad_topics(topic: str) -> None:
    assert reason_of(check(topic)) == r.BAD_TOPIC


@pytest.mark.parametrize(
    ("site", "pi_tag", "reason"),
    [
        ("S" * 1024, "T", None),  # exactly Pub/Sub's 1,024 bytes: taken
        ("S" * 1025, "T", r.SITE_CODE_TOO_LONG),
        ("é" * 513, "T", r.SITE_CODE_TOO_LONG),  # 513 characters, 1,026 bytes: the limit is in bytes
        ("MOR", "T" * 1024, None),
        ("MOR", "€" * 342, r.PI_TAG_TOO_LONG),  # 1,026 bytes
    ],
)
def test_topic_levels_longer_than_pubsub_takes_are_rejected_naming_the_limit(
    site: str, pi_tag: str, reason: str | None
) -> None:
    outcome = check(f"FCTS/FAE/{site}/SolvExtract/{pi_tag}", {**GOOD, "site_code": site})
    if reason is None:
        assert isinstance(outcome, Reading)
    else:
        assert reason_of(outcome) == reason
        assert isinstance(outcome, Reject) and "1,024 bytes" in outcome.detail and "Pub/Sub" in outcome.detail


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", r.BAD_ENCODING),
        ("not json", r.BAD_JSON),
        ('{"value": NaN}', r.BAD_JSON),
        ('{"value": Infinity}', r.BAD_JSON),
        (
            '{"site_code": "MOR", "site_code": "MOR", "sensor_id": "a", '
            '"timestamp": "2026-01-01T00:00:00Z", "value": 1}',
            r.BAD_JSON,
        ),
        ("[1, 2]", r.NOT_AN_OBJECT),
        ('"MOR"', r.NOT_AN_OBJECT),
        ({**GOOD, "site_code": ""}, r.BAD_SITE_CODE),
        ({**GOOD, "site_code": 7}, r.BAD_SITE_CODE),
        ({**GOOD, "site_code": "BAG"}, r.SITE_MISMATCH),
        ({**GOOD, "sensor_id": " "}, r.BAD_SENSOR_ID),
        ({**GOOD, "sensor_id": None}, r.BAD_SENSOR_ID),
        ({**GOOD, "timestamp": "2026-11-20T08:15:30"}, r.BAD_TIMESTAMP),
        ({**GOOD, "timestamp": "yesterday"}, r.BAD_TIMESTAMP),
        ({**GOOD, "timestamp": 1700000000}, r.BAD_TIMESTAMP),
        ({**GOOD, "timestamp": "2026-11-20T08:15:30+00:00:01"}, r.BAD_TIMESTAMP),
        ({**GOOD, "timestamp": "20261120T081530Z"}, r.BAD_TIMESTAMP),
        ({**GOOD, "timestamp": "2026-02-30T08:15:30Z"}, r.BAD_TIMESTAMP),
        ({**GOOD, "value": "1.5"}, r.BAD_VALUE),
        ({**GOOD, "value": True}, r.BAD_VALUE),
        ({**GOOD, "value": None}, r.BAD_VALUE),
        ('{"site_code": "MOR", "sensor_id": "a", "timestamp": "2026-01-01T00:00:00Z", "value": 1e999}', r.BAD_VALUE),
        (
            '{"site_code": "MOR", "sensor_id": "a", "timestamp": "2026-01-01T00:00:00Z", "value": ' + "9" * 400 + "}",
            r.BAD_VALUE,
        ),
        ({"site_code": "MOR", "sensor_id": "a", "value": 1}, r.MISSING_FIELD),
        (b"{" + b" " * (64 * 1024) + b"}", r.PAYLOAD_TOO_LARGE),
        ("[" * 100_000 + "]" * 100_000, r.PAYLOAD_TOO_LARGE),
        ("[" * 20_000 + "]" * 20_000, r.BAD_JSON),
    ],
)
def test_bad_payloads(payload: bytes | str | dict, reason: str) -> None:
    outcome = check(payload=payload)
    assert reason_of(outcome) == reason
    assert isinstance(outcome, Reject) and outcome.detail


def test_a_missing_field_is_named() -> None:
    outcome = check(payload={"site_code": "MOR", "value": 1})
    assert isinstance(outcome, Reject) and outcome.detail == "missing sensor_id, timestamp"


def test_timestamps_are_normalised_to_utc() -> None:
    outcome = check(payload={**GOOD, "timestamp": "2026-11-20T01:15:30.250-07:00"})
    assert isinstance(outcome, Reading)
    assert outcome.timestamp == datetime(2026, 11, 20, 8, 15, 30, 250000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "taken"),
    [
        ("2021-11-23T00:00:00Z", True),  # NOW (2026-11-22) less 1825 days: the window's first day
        ("2021-11-22T23:59:59.999999Z", False),
        ("2027-11-23T23:59:59.999999Z", True),  # NOW plus 366 days: its last day
        ("2027-11-24T00:00:00Z", False),
        ("2027-11-24T00:30:00+01:00", True),  # the 23rd in UTC: partitions are UTC days
        ("1970-01-01T00:00:00Z", False),  # a sensor clock reset
        ("2000-01-01T00:00:00Z", False),
    ],
)
def test_a_time_bigquery_would_not_take_is_a_reject_with_its_own_reason(moment: str, taken: bool) -> None:
    outcome = check(payload={**GOOD, "timestamp": moment})
    if taken:
        assert isinstance(outcome, Reading)
        return
    assert reason_of(outcome) == r.TIMESTAMP_OUT_OF_WINDOW
    assert isinstance(outcome, Reject) and "1825 days back to 366 ahead" in outcome.detail
    assert "BIGQUERY_PARTITION_DAYS_PAST" in outcome.detail


def test_the_window_is_the_configured_one_and_the_whole_timestamp_range_parses_exactly() -> None:
    narrow = PartitionWindow(days_past=1, days_future=0)
    yesterday, ahead = "2026-11-21T00:00:00Z", "2026-11-23T00:00:00Z"
    assert isinstance(
        validate(Inbound(TOPIC, json.dumps({**GOOD, "timestamp": yesterday}).encode(), NOW), narrow), Reading
    )
    refused = validate(Inbound(TOPIC, json.dumps({**GOOD, "timestamp": ahead}).encode(), NOW), narrow)
    assert reason_of(refused) == r.TIMESTAMP_OUT_OF_WINDOW
    # A window as wide as a project could be granted: BigQuery's whole range, to the microsecond.
    everything = PartitionWindow(days_past=3_652_058, days_future=3_652_058)
    for moment, expected in [
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ]:
        outcome = validate(Inbound(TOPIC, json.dumps({**GOOD, "timestamp": moment}).encode(), NOW), everything)
        assert isinstance(outcome, Reading) and outcome.timestamp == expected


def test_non_utf8_payload_is_kept_escaped_for_audit() -> None:
    outcome = check(payload=b'{"value": "\xff"}')
    assert isinstance(outcome, Reject) and outcome.payload == '{"value": "\\xff"}'


def test_redelivery_keeps_the_event_id_and_a_different_payload_changes_it() -> None:
    first, again = check(), check()
    other = check(payload={**GOOD, "value": 2.5})
    assert isinstance(first, Reading) and isinstance(again, Reading) and isinstance(other, Reading)
    assert first.event_id == again.event_id != other.event_id


# -- properties ---------------------------------------------------------------------------------------------

level = st.text(st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)
zones = st.integers(-23 * 60, 23 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
# Inside BigQuery's partition window around NOW, a day's margin each side for the zones.
moments = st.datetimes(min_value=datetime(2021, 11, 24), max_value=datetime(2027, 11, 22), timezones=zones)


@given(
    site=level,
    tag=level,
    sensor=level.filter(str.strip),
    value=finite,
    moment=moments,
    extra=st.dictionaries(st.text(max_size=5).filter(lambda k: k not in GOOD), st.integers(), max_size=3),
)
@settings(max_examples=300)
def test_any_well_formed_reading_is_accepted_as_sent(
    site: str, tag: str, sensor: str, value: float, moment: datetime, extra: dict[str, int]
) -> None:
    if not site.strip():
        site = "S" + site
    payload = {"site_code": site, "sensor_id": sensor, "timestamp": moment.isoformat(), "value": value, **extra}
    outcome = check(f"FCTS/FAE/{site}/SolvExtract/{tag}", payload)
    assert isinstance(outcome, Reading), outcome
    assert (outcome.site_code, outcome.pi_tag, outcome.sensor_id) == (site, tag, sensor)
    assert outcome.value == float(value) and math.isfinite(outcome.value)
    assert outcome.timestamp == moment and outcome.timestamp.tzinfo == UTC


@given(topic=st.text(max_size=60), payload=st.binary(max_size=200))
@settings(max_examples=500)
def test_arbitrary_input_is_accepted_or_rejected_with_a_known_reason(topic: str, payload: bytes) -> None:
    outcome = check(topic, payload)
    assert isinstance(outcome, Reading) or outcome.reason in r.REASONS
