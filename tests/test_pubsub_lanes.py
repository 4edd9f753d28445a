"""The Pub/Sub sender on Publish RPCs: sites hashed onto lanes that never hold each other up, requests of up
to 1,000 messages, and per-site order through Google's emulator's ordered subscription."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fmi_bridge.spool import lane_of
from tests.conftest import Cloud, assert_delivered, start_bridge
from tests.pubsub_server import Faults
from tests.support import Bridge, Broker, expected_ids, publish, readings, site_sequences, wait_until

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


def test_requests_carry_up_to_a_thousand_messages(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    faults.unavailable = True  # let a backlog gather, then drain it
    bridge = start_bridge(bridges, cloud, broker, PUBSUB_LANES="2")
    messages = readings([f"S{n}" for n in range(10)], 600)
    publish(broker.port, messages)
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(messages), 30, "backlog")
    calls_before = faults.publish_calls

    faults.unavailable = False

    assert cloud.reader.wait_for(len(messages), 60) == expected_ids(messages)
    assert faults.largest_request == 1000
    assert faults.publish_calls - calls_before < 20  # 6,000 messages in batches, not one by one


def test_order_per_site_holds_through_googles_ordered_subscription(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    start_bridge(bridges, cloud, broker, PUBSUB_LANES="3")
    messages = readings([f"S{n}" for n in range(12)], 400)

    publish(broker.port, messages)

    assert_delivered(cloud, messages)
