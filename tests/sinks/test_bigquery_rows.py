"""Rows as the Storage Write API takes them: TIMESTAMP as exact microseconds since the epoch over the whole range
BigQuery takes (0001-01-01 to 9999-12-31 23:59:59.999999 UTC)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fmi_bridge.events import rfc3339
from fmi_bridge.sinks.bigquery_write import micros


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01T00:00:00.000000Z", 0),
        ("1969-12-31T23:59:59.500000Z", -500_000),  # before the epoch with a fraction: not a second late
        ("0001-01-01T00:00:00.000000Z", -62_135_596_800_000_000),
        ("9999-12-31T23:59:59.999999Z", 253_402_300_799_999_999),  # BigQuery's last microsecond, not past it
        ("2026-11-20T08:15:30.123456Z", 1_795_162_530_123_456),
    ],
)
def test_timestamps_are_exact_microseconds(text: str, expected: int) -> None:
    assert micros(text) == expected


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)))
def test_every_microsecond_of_the_range_round_trips(moment: datetime) -> None:
    stamped = moment.replace(tzinfo=UTC)
    whole_seconds = calendar.timegm(stamped.timetuple())  # integer calendar arithmetic, no float
    assert micros(rfc3339(stamped)) == whole_seconds * 1_000_000 + stamped.microsecond


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
    )
)
def test_a_stamp_is_the_utc_time_in_iso_8601_with_a_z(moment: datetime) -> None:
    expected = moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    assert rfc3339(moment) == expected
