"""Bad input is rejected with a reason, kept in the rejects table, and never stops the good readings."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from fmi_bridge import readings as r
from tests.conftest import Cloud, assert_delivered, start_bridge
from tests.support import (
    Bridge,
    Broker,
    Published,
    bq_query,
    expected_ids,
    mosquitto_pub,
    publish,
    reading,
    wait_until,
)

GOOD = {"site_code": "MOR", "sensor_id": "FT-1", "timestamp": "2026-11-20T08:00:00Z", "value": 1.0}
T = "FCTS/FAE/MOR/SolvExtract/TAG"

BAD = {
    r.BAD_TOPIC: Published("FCTS/FAE/MOR/Other/TAG", json.dumps(GOOD).encode()),
    r.PAYLOAD_TOO_LARGE: Published(T, json.dumps({**GOOD, "pad": "x" * 70_000}).encode()),
    r.BAD_ENCODING: Published(T, b'{"site_code": "MOR\xff"}'),
    r.BAD_JSON: Published(T, b'{"value": NaN}'),
    r.NOT_AN_OBJECT: Published(T, b"[1, 2, 3]"),
    r.MISSING_FIELD: Published(T, json.dumps({"site_code": "MOR"}).encode()),
    r.BAD_SITE_CODE: Published(T, json.dumps({**GOOD, "site_code": ""}).encode()),
    r.SITE_MISMATCH: Published(T, json.dumps({**GOOD, "site_code": "BAG"}).encode()),
    r.BAD_SENSOR_ID: Published(T, json.dumps({**GOOD, "sensor_id": 12}).encode()),
    r.BAD_TIMESTAMP: Published(T, json.dumps({**GOOD, "timestamp": "2026-11-20 08:00"}).encode()),
    # a sensor clock reset: BigQuery's partitioned table would refuse it, so Pub/Sub does not get it either
    r.TIMESTAMP_OUT_OF_WINDOW: Published(T, json.dumps({**GOOD, "timestamp": "1970-01-01T00:00:00Z"}).encode()),
    r.BAD_VALUE: Published(T, json.dumps({**GOOD, "value": "12.5"}).encode()),
    # Pub/Sub's 1,024-byte ordering key and attribute value: 600 characters, 1,200 bytes in UTF-8
    r.SITE_CODE_TOO_LONG: Published(f"FCTS/FAE/{'é' * 600}/SolvExtract/TAG", json.dumps(GOOD).encode()),
    r.PI_TAG_TOO_LONG: Published(f"FCTS/FAE/MOR/SolvExtract/{'é' * 600}", json.dumps(GOOD).encode()),
}


def test_every_reject_reason_lands_in_the_rejects_table_and_good_readings_still_flow(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    assert set(BAD) == set(r.REASONS) - {r.UNPROCESSABLE}  # no known input reaches it: see test_intake
    bridge = start_bridge(bridges, cloud, broker, MQTT_TOPIC="FCTS/FAE/#")
    good = [reading("MOR", seq) for seq in range(len(BAD) + 1)]
    mixed = [message for pair in zip(good, BAD.values(), strict=False) for message in pair] + good[len(BAD) :]

    publish(broker.port, mixed)

    rows = wait_until(
        lambda: (rs := bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`")) and len(rs) >= len(BAD) and rs,
        60,
        "every reject in BigQuery",
    )
    time.sleep(1)  # a duplicate row would be written by now
    rows = bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`")
    assert sorted(row["reason"] for row in rows) == sorted(BAD)  # one row a reject: counted, not keyed
    by_reason = {row["reason"]: row for row in rows}
    for reason, message in BAD.items():
        row = by_reason[reason]
        assert row["mqtt_topic"] == message.topic
        assert row["detail"]
        if reason == r.BAD_ENCODING:
            assert row["payload"] == '{"site_code": "MOR\\xff"}'
        elif reason == r.PAYLOAD_TOO_LARGE:
            assert len(row["payload"]) == 64 * 1024  # the start of it is kept
        else:
            assert row["payload"] == message.payload.decode()
    assert_delivered(cloud, good, timeout=30)  # the good ones, and no reject, in Pub/Sub and BigQuery alike
    for reason in BAD:
        assert bridge.metric("fmi_bridge_messages_rejected_total", f'reason="{reason}"') == 1
    assert bridge.metric("fmi_bridge_messages_accepted_total") == len(good)


# What a gateway sends when it cuts a string in the middle of an emoji: a JSON escape of a lone surrogate.
POISON = b'{"site_code":"MOR","sensor_id":"\\ud800","timestamp":"2026-11-20T08:15:40Z","value":9}'


def test_a_lone_surrogate_is_rejected_and_the_bridge_keeps_going(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    assert mosquitto_pub(broker.port, T, POISON).returncode == 0
    after = [reading("MOR", seq) for seq in range(5)]

    publish(broker.port, after)

    assert cloud.reader.wait_for(len(after), timeout=30) == expected_ids(after)
    rows = wait_until(lambda: bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`"), 30, "the reject")
    assert [(row["reason"], row["payload"]) for row in rows] == [(r.BAD_ENCODING, POISON.decode())]
    assert "U+D800" in rows[0]["detail"]
    assert bridge.alive()
    assert bridge.metric("fmi_bridge_mqtt_connects_total") == 1  # never restarted, never redelivered


def test_a_topic_one_level_too_deep_is_a_visible_reject_under_the_default_filter(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)  # default MQTT_TOPIC
    deep = Published("FCTS/FAE/MOR/SolvExtract/PI/X", json.dumps(GOOD).encode())

    publish(broker.port, [deep])

    rows = wait_until(lambda: bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`"), 30, "the reject")
    assert [(row["reason"], row["mqtt_topic"]) for row in rows] == [(r.BAD_TOPIC, deep.topic)]
    assert bridge.metric("fmi_bridge_messages_rejected_total", 'reason="bad_topic"') == 1
