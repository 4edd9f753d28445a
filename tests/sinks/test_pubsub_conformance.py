"""The Pub/Sub conformance layer refuses what Google's service refuses: one request breaking each rule, sent by
the real client, is answered with the rule's status code, and a request within every limit passes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1 import PublisherClient, types
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

from tests.conftest import PubSubEndpoint
from tests.sinks.pubsub_conformance import KEY_RATE, RULES, Rule

pytestmark = pytest.mark.pubsub_refusals
_topics = itertools.count(1)


def message(data: bytes = b"x", key: str = "", **attributes: str) -> Any:
    return types.PubsubMessage(data=data, ordering_key=key, attributes=attributes)


BREAKING: dict[str, list[Any]] = {
    "one ordering key per request": [message(key="A"), message(key="B")],
    "at most 1,000 messages per request": [message(key="A")] * 1001,
    "at most 10 MB per request": [message(b"x" * 6_000_000, key="A")] * 2,
    "data or at least one attribute": [message(b"", key="A")],
    "ordering key at most 1 KB": [message(key="K" * 1025)],
    "at most 100 attributes": [message(key="A", **{f"a{n}": "v" for n in range(101)})],
    "attribute key at most 256 bytes": [message(key="A", **{"k" * 257: "v"})],
    "attribute value at most 1,024 bytes": [message(key="A", pi_tag="é" * 513)],
    "attribute keys do not start with goog": [message(key="A", googley="v")],
}


def client_for(host: str) -> Any:
    channel = grpc.insecure_channel(host)
    return PublisherClient(transport=PublisherGrpcTransport(channel=channel, credentials=AnonymousCredentials()))


@pytest.fixture
def topic(pubsub_endpoint: PubSubEndpoint) -> Iterator[tuple[Any, str]]:
    client = client_for(pubsub_endpoint.host)
    name = client.create_topic(name=f"projects/fmi-test/topics/conformance-{next(_topics)}").name
    yield client, name
    client.transport.close()


def publish(client: Any, topic: str, messages: list[Any]) -> None:
    client.publish(topic=topic, messages=messages, retry=None, timeout=30)


def test_every_rule_has_a_breaking_request() -> None:
    assert set(BREAKING) == {rule.name for rule in RULES}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_each_rule_refuses_a_request_that_breaks_it(
    rule: Rule, topic: tuple[Any, str], pubsub_endpoint: PubSubEndpoint
) -> None:
    client, name = topic
    with pytest.raises(exceptions.GoogleAPICallError) as refused:
        publish(client, name, BREAKING[rule.name])
    assert refused.value.grpc_status_code == rule.code
    assert pubsub_endpoint.layer.refusals == [rule.name]


def test_a_key_faster_than_one_megabyte_a_second_is_slowed_and_other_keys_are_not(
    topic: tuple[Any, str], pubsub_endpoint: PubSubEndpoint
) -> None:
    client, name = topic
    big = [message(b"x" * 300_000, key="FAST")] * 2  # 600 KB a request
    publish(client, name, big)
    with pytest.raises(exceptions.ResourceExhausted):
        publish(client, name, big)
    publish(client, name, [message(b"x" * 300_000, key="OTHER")] * 2)
    assert pubsub_endpoint.layer.refusals == [KEY_RATE.name]


def test_a_request_at_every_limit_passes(topic: tuple[Any, str], pubsub_endpoint: PubSubEndpoint) -> None:
    client, name = topic
    at_limits = message(key="K" * 1024, **{"k" * 256: "v" * 1024}, **{f"a{n}": "v" for n in range(99)})
    publish(client, name, [at_limits] * 2)
    publish(client, name, [message(key="A")] * 1000)
    publish(client, name, [message(b"x" * 900_000)] * 11)  # 9.9 MB, no ordering key (no per-key rate)
    assert pubsub_endpoint.layer.refusals == []


def test_the_emulator_alone_takes_what_the_service_refuses(google_pubsub: PubSubEndpoint | None) -> None:
    """Why the layer exists: Google's emulator accepts mixed ordering keys and an over-long key."""
    if google_pubsub is None:
        pytest.skip("Google's Pub/Sub emulator is not installed")
    client = client_for(google_pubsub.layer.upstream)
    name = client.create_topic(name=f"projects/fmi-test/topics/conformance-{next(_topics)}").name
    publish(client, name, BREAKING["one ordering key per request"])
    publish(client, name, BREAKING["ordering key at most 1 KB"])
    client.transport.close()
