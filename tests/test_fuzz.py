"""Fuzzing the message path: no input raises out of it, and each is accepted or rejected with a known reason.

The path is the one the intake runs: validate → spool row → commit to a real spool. Text is drawn from the whole
of Unicode, lone surrogates included (Hypothesis leaves category Cs out unless asked), and JSON escapes of them.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmi_bridge.events import kpi_message, kpi_message_of_body, reading_row
from fmi_bridge.intake import Intake
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt.inbox import Inbox
from fmi_bridge.readings import BAD_ENCODING, BAD_JSON, REASONS, UNPROCESSABLE, Inbound, Reading
from fmi_bridge.spool import READING, Spool, entry

NOW = datetime(2026, 11, 22, tzinfo=UTC)
VALID_TOPIC = "FCTS/FAE/MOR/SolvExtract/TAG"

any_char = st.characters(exclude_categories=())  # every code point, surrogates included
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
any_text = st.text(any_char | surrogate, max_size=20)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(any_char, max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.sampled_from(
        ["MOR", "", " ", "2026-11-20T08:00:00Z", "2026-11-20", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"]
    ),
)
near_readings = st.fixed_dictionaries(
    {},
    optional={
        "site_code": field_values,
        "sensor_id": field_values,
        "timestamp": field_values,
        "value": field_values,
    },
).map(lambda document: json.dumps(document).encode())
tokens = st.sampled_from(
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e999",
        b"-1e999",
        b"9" * 5000,
        b"\xff",
        b"\xed\xa0\x80",
        b'"\\ud800"',
        b"null",
        b"true",
        b"{",
        b"}",
        b"[",
        b'"a":1',
        b",",
        b" ",
        b'"\\ud800"',
        b'"\\udfff"',
        b'"\\ud83d\\ude00"',
        b'"\\ud83d"',
        b'"\\u"',
        b'"\\uZZZZ"',
        b'"\\ud800\\u12"',
        b'"\\',
    ]
)
# Valid readings but for one field, which holds a JSON escape: lone or paired surrogates, or malformed ones.
escapes = st.sampled_from([b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\ud83d", b"\\u00", b"\\uD800x", b"\\x41"])
escaped_fields = st.tuples(st.sampled_from(["site_code", "sensor_id", "timestamp"]), escapes).map(
    lambda pair: (
        json.dumps(
            {"site_code": "MOR", "sensor_id": "FT-1", "timestamp": "2026-11-20T08:00:00Z", "value": 1, pair[0]: "@"}
        )
        .encode()
        .replace(b'"@"', b'"MOR' + pair[1] + b'"')
    )
)
token_soup = st.lists(tokens, max_size=30).map(b"".join)
templated = st.tuples(
    st.sampled_from([b"NaN", b"Infinity", b"1e400", b"-0", b"1" * 400, b'"1.5"', b"true"]),
    st.sampled_from([b'"MOR"', b'"BAG"', b'""', b"1"]),
).map(
    lambda parts: (
        b'{"site_code": %s, "sensor_id": "a", "timestamp": "2026-11-20T08:00:00Z", "value": %s}' % (parts[1], parts[0])
    )
)
duplicates = st.just(
    b'{"site_code": "MOR", "sensor_id": "a", "sensor_id": "b", "timestamp": "2026-11-20T08:00:00Z", "value": 1}'
)
deep = st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth)
oversized = st.integers(64 * 1024 - 8, 64 * 1024 + 8).map(lambda size: b'{"pad": "' + b"x" * size + b'"}')
payloads = st.one_of(
    st.binary(max_size=300),
    near_readings,
    token_soup,
    templated,
    duplicates,
    deep,
    oversized,
    escaped_fields,
    st.text(any_char | surrogate, max_size=100).map(lambda text: text.encode("utf-8", "surrogatepass")),
)
topics = st.one_of(
    st.text(any_char, max_size=60),
    st.just(VALID_TOPIC),
    st.builds("FCTS/FAE/{}/SolvExtract/{}".format, st.text(any_char, max_size=10), st.text(any_char, max_size=10)),
    st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "backslashreplace")),
)


def test_no_input_raises_out_of_the_message_path(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool", max_bytes=10**9, min_free_bytes=1, reading_bits=3, reject_bits=2)
    metrics = Metrics()
    intake = Intake(spool, metrics, Inbox(), ack=lambda messages: None, committed=lambda: None)
    seen: Counter[str] = Counter()

    @given(topic=topics, payload=payloads)
    @settings(
        max_examples=10_000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    def one(topic: str, payload: bytes) -> None:
        (taken,) = intake.entries([Inbound(topic, payload, NOW)])
        assert spool.append([taken]) == 1  # the row is JSON the spool can store
        row = json.loads(taken.body)
        if taken.kind == READING:
            seen["accepted"] += 1
            assert kpi_message_of_body(taken.body) == kpi_message(row)
        else:
            assert row["reason"] in REASONS and row["detail"]
            assert row["reason"] != UNPROCESSABLE, row  # every input has a reason of its own
            seen[row["reason"]] += 1

    one()
    print(f"\nfuzz: {sum(seen.values())} inputs: {dict(seen.most_common())}")
    total = sum(seen.values())
    assert total >= 10_000
    assert seen["accepted"] > 0 and seen[BAD_ENCODING] > 0 and seen[BAD_JSON] > 0
    assert metrics.registry.get_sample_value("fmi_bridge_messages_received_total") == total
    # An input drawn twice is one message delivered again: acknowledged, not spooled a second time.
    assert spool.stats().records + spool.duplicates == total


# Text that looks like the row's own keys, quotes and backslashes: what a cut of the stored text could trip on.
keyish = st.lists(
    st.characters(exclude_categories=["Cs"])
    | st.sampled_from(['"', "\\", ',"payload":', ',"pi_tag":"', ',"site_code":"', '{"event_id":"']),
    min_size=1,
    max_size=12,
).map("".join)


@given(site=keyish, tag=keyish, sensor=keyish, value=st.floats(allow_nan=False, allow_infinity=False), extra=keyish)
@settings(max_examples=1_000, deadline=None, database=None)
def test_the_kpi_message_cut_from_the_stored_row_is_the_one_decoded_from_it(
    site: str, tag: str, sensor: str, value: float, extra: str
) -> None:
    topic = f"FCTS/FAE/{site}/SolvExtract/{tag}"
    payload = json.dumps({"site_code": site, "sensor_id": sensor, "value": value, "x": extra}, ensure_ascii=False)
    reading = Reading(extra[:32], site, tag, sensor, value, NOW, NOW, topic, payload)
    body = entry(READING, site, reading_row(reading)).body
    assert kpi_message_of_body(body) == kpi_message(json.loads(body))
