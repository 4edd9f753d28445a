"""The Pub/Sub sender on Publish RPCs: sites hashed onto lanes that never hold each other up, requests of up
to 1,000 messages, and per-site order through Google's emulator's ordered subscription."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from fmi_bridge.spool import lane_of
from tests.conftest import Cloud, PubSubEndpoint, assert_delivered, start_bridge
from tests.sinks.pubsub_server import Faults
from tests.support import (
    Bridge,
    Broker,
    Published,
    bq_query,
    expected_ids,
    publish,
    readings,
    site_sequences,
    wait_until,
)

pytestmark = pytest.mark.slow

LANES = 4


def sites_with_one_alone() -> tuple[str, list[str]]:
    """A site that is alone in its lane, and sites that fill the other lanes."""
    sites = [f"S{n:02d}" for n in range(1, 40)]
    by_lane: dict[int, list[str]] = {}
    for site in sites:
        by_lane.setdefault(lane_of(site, LANES), []).append(site)
    lone = by_lane[0][0]
    others = [site for lane, members in by_lane.items() if lane != 0 for site in members[:2]]
    assert len({lane_of(site, LANES) for site in others}) == LANES - 1
    return lone, others


def test_a_lane_that_keeps_failing_holds_up_no_other(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    lone, others = sites_with_one_alone()
    faults.reject = lambda message: message.ordering_key == lone  # every message of one site, for good
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES=str(LANES), PUBSUB_DEADLETTER_ATTEMPTS="1000")
    held, flowing = readings([lone], 100), readings(others, 300)

    publish(broker.port, held + flowing)

    assert cloud.reader.wait_for(len(flowing), 60) == expected_ids(flowing)
    sequences = site_sequences(cloud.reader.events())
    assert lone not in sequences
    for site in others:
        assert sequences[site] == list(range(300))
    assert bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(held)
    assert bridge.metric("fmi_bridge_lane_failed_total", f'lane="pubsub/{lane_of(lone, LANES)}"') > 0


def test_requests_carry_up_to_a_thousand_messages_of_one_site(
    broker: Broker, cloud: Cloud, faults: Faults, pubsub_endpoint: PubSubEndpoint, bridges: Callable[..., Bridge]
) -> None:
    faults.unavailable = True  # let a backlog gather, then drain it
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES="2")
    messages = readings([f"S{n}" for n in range(4)], 1500)
    publish(broker.port, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(messages), 30, "backlog")
    calls_before = faults.publish_calls

    faults.unavailable = False

    assert cloud.reader.wait_for(len(messages), 60) == expected_ids(messages)
    assert faults.largest_request == 1000
    assert faults.publish_calls - calls_before <= 12  # 6,000 messages of 4 sites: 2 requests a site, and retries
    assert set(pubsub_endpoint.layer.keys_per_request) == {1}  # Google's rule: one ordering key a request


def test_order_per_site_holds_through_googles_ordered_subscription(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    start_bridge(bridges, cloud, broker, PUBSUB_LANES="3")
    messages = readings([f"S{n}" for n in range(12)], 400)

    publish(broker.port, messages)

    assert_delivered(cloud, messages)


def test_a_failing_site_holds_up_no_other_site_of_its_lane(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    faults.reject = lambda message: message.ordering_key == "HELD"  # refused as invalid, for good
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES="1", PUBSUB_DEADLETTER_ATTEMPTS="1000")
    held, flowing = readings(["HELD"], 50), readings(["A", "B", "C"], 300)

    publish(broker.port, held + flowing)

    assert cloud.reader.wait_for(len(flowing), 60) == expected_ids(flowing)
    sequences = site_sequences(cloud.reader.events())
    assert "HELD" not in sequences and all(sequences[site] == list(range(300)) for site in "ABC")
    assert bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(held)
    assert bridge.metric("fmi_bridge_lane_failed_total", 'lane="pubsub",code="INVALID_ARGUMENT"') > 0


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "roles/pubsub.publisher"),
        (grpc.StatusCode.FAILED_PRECONDITION, "report it"),
        (grpc.StatusCode.NOT_FOUND, "provision"),
    ],
)
def test_a_refusal_waiting_cannot_cure_is_one_error_naming_the_code_and_the_remedy(
    code: grpc.StatusCode, action: str, broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    faults.reject, faults.reject_code = (lambda message: True), code
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES="1")
    messages = readings(["MOR"], 20)
    publish(broker.port, messages)
    wait_until(lambda: faults.refused_calls >= 4, 30, "several refused attempts")

    errors = [e for e in bridge.log_entries() if e.get("message", "").startswith("Pub/Sub refused a request")]
    assert len(errors) == 1, errors  # once per change, not once per attempt
    assert errors[0]["severity"] == "ERROR" and errors[0]["code"] == code.name and action in errors[0]["action"]
    assert bridge.metric("fmi_bridge_lane_failed_total", f'lane="pubsub",code="{code.name}"') >= 4

    faults.reject = None  # the operator fixed it: nothing was lost meanwhile
    assert cloud.reader.wait_for(len(messages), 60) == expected_ids(messages)


def test_a_site_slowed_by_the_service_waits_alone(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    """RESOURCE_EXHAUSTED (the per-key throughput limit) slows that ordering key only."""
    faults.reject, faults.reject_code = (lambda m: m.ordering_key == "FAST"), grpc.StatusCode.RESOURCE_EXHAUSTED
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES="1")
    slowed, others = readings(["FAST"], 100), readings(["A", "B"], 200)
    publish(broker.port, slowed + others)

    assert cloud.reader.wait_for(len(others), 60) == expected_ids(others)
    faults.reject = None
    assert cloud.reader.wait_for(len(slowed + others), 60) == expected_ids(slowed + others)
    assert site_sequences(cloud.reader.events())["FAST"] == list(range(100))
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total") == 0
    assert not [e for e in bridge.log_entries() if e.get("severity") == "ERROR"]  # a slow-down, not a fault


def test_a_site_backlog_drains_within_its_throughput_budget_and_no_other_site_waits(
    broker: Broker, cloud: Cloud, pubsub_endpoint: PubSubEndpoint, bridges: Callable[..., Bridge]
) -> None:
    budget = 40_000  # bytes a second for one ordering key, set low so that a small backlog meets it
    start_bridge(bridges, cloud, broker, PUBSUB_LANES="1", PUBSUB_KEY_BYTES_PER_SECOND=str(budget))
    big, small = readings(["BIG"], 900), readings(["SMALL"], 50)  # about 300 KB of messages for BIG
    publish(broker.port, big + small)

    assert cloud.reader.wait_for(len(big + small), 60) == expected_ids(big + small)
    layer = pubsub_endpoint.layer
    assert 0 < layer.most_bytes_in_a_second("BIG") <= budget
    arrivals = [t for t, _ in layer.key_history["BIG"]]
    total = sum(size for _, size in layer.key_history["BIG"])
    assert arrivals[-1] - arrivals[0] >= total / budget - 1.5  # paced: it took the time the budget asks
    assert max(t for t, _ in layer.key_history["SMALL"]) < arrivals[-1] - 3  # SMALL did not wait behind BIG


def test_a_request_that_lands_but_whose_answer_is_late_is_sent_again_never_reordered(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    """The server stores the request, then answers after the bridge gave up waiting: the bridge sends it again.
    Duplicates, never a reordering of first deliveries (docs/reliability.md)."""
    faults.latency_seconds = 2.0  # longer than the request's deadline below: every answer comes too late
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES="1", SINK_TIMEOUT_SECONDS="1")
    messages = readings(["A", "B"], 50)
    publish(broker.port, messages)
    wait_until(lambda: faults.publish_calls >= 4, 30, "requests sent and sent again")

    faults.latency_seconds = 0.0
    assert_delivered(cloud, messages)  # every reading, first deliveries in publish order per site
    # The late answers counted as failures, and their requests sent again (what landed twice is the duplicates
    # consumers drop by event_id; how many depends on the timing, so they are not counted here).
    assert bridge.metric("fmi_bridge_lane_failed_total", 'code="DEADLINE_EXCEEDED"') >= 1
    assert faults.publish_calls >= 4  # two sites' first requests, and each sent again


def test_a_message_larger_than_the_sites_throughput_budget_still_goes(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    """PUBSUB_KEY_BYTES_PER_SECOND at its lowest (1,000 bytes) and readings of about 4 KB each: each goes alone
    once the site's window is empty, in order; none stalls its site."""
    start_bridge(bridges, cloud, broker, PUBSUB_KEY_BYTES_PER_SECOND="1000", PUBSUB_LANES="1")
    messages = [
        Published(m.topic, m.payload.replace(b'"sensor_id": "s1"', ('"sensor_id": "' + "s" * 4000 + '"').encode()))
        for m in readings(["MOR", "BAG"], 3)
    ]
    assert all(len(m.payload) > 4000 for m in messages)
    publish(broker.port, messages)
    assert_delivered(cloud, messages, timeout=60)


def test_a_refusal_of_every_message_holds_the_lanes_with_no_dead_letter_and_keeps_order(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    """Every Publish refused with INVALID_ARGUMENT for 30 s (as a schema attached to the topic that the events do
    not match would): the cause is the topic, not the readings. One ERROR, no dead letter, and once the topic
    takes messages again every reading is delivered, in order per site."""
    bridge = start_bridge(bridges, cloud, broker)
    faults.reject = lambda message: True
    refusing_since = time.monotonic()
    messages = readings([f"S{n}" for n in range(6)], 100)
    publish(broker.port, messages)
    wait_until(lambda: faults.refused_calls >= 30, 30, "refusals")
    time.sleep(max(0.0, 30 - (time.monotonic() - refusing_since)))  # every Publish refused for 30 s in all
    refusing = [
        e
        for e in bridge.log_entries()
        if e.get("message") == "Pub/Sub refuses every message; the readings stay in the spool"
    ]
    assert len(refusing) == 1 and "topic" in refusing[0]["action"]
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total") == 0
    faults.reject = None
    assert_delivered(cloud, messages, timeout=90)
    assert bq_query(cloud.bq, f"SELECT count(*) FROM `{cloud.rejects_table}`")[0][0] == 0
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total") == 0
