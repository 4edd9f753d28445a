"""A conformance layer in front of a Pub/Sub stand-in (Google's emulator or the in-repo server): it refuses a
Publish request the way Google's service does, with the service's status codes, and passes everything else
through byte for byte. The emulator takes mixed ordering keys, 2,000-byte keys and attribute values; the
service does not, so every Pub/Sub test goes through this layer.

The rules are data (RULES): name, status code, message, source, and the check. tests/sinks/test_pubsub_conformance.py
walks the table and shows each rule refusing a request that breaks it. What the layer cannot know of the
service is said next to the rule (the per-key throughput code).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.pubsub_v1 import types

QUOTAS = "https://cloud.google.com/pubsub/quotas#resource_limits"
_Request = types.PublishRequest.pb()
STREAMING = {"StreamingPull"}  # the only streaming methods of the Publisher and Subscriber services
SERVICES = ("google.pubsub.v1.Publisher", "google.pubsub.v1.Subscriber", "google.pubsub.v1.SchemaService")


@dataclass(frozen=True)
class Rule:
    name: str
    code: grpc.StatusCode
    message: str
    source: str
    broken_by: Callable[[Any], bool]  # the parsed PublishRequest → True when the request breaks the rule


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _any_message(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda request: any(check(message) for message in request.messages)


def _any_attribute(check: Callable[[str, str], bool]) -> Callable[[Any], bool]:
    return _any_message(lambda m: any(check(key, value) for key, value in m.attributes.items()))


RULES: tuple[Rule, ...] = (
    Rule(
        "one ordering key per request",
        grpc.StatusCode.FAILED_PRECONDITION,
        "In a single publish request, all messages must have no ordering key or they must all have the same "
        "ordering key. [code=539b]",
        "PubsubMessage.ordering_key in google/pubsub_v1/types/pubsub.py; message as quoted in "
        "yoshidan/google-cloud-rust#226",
        lambda request: len({message.ordering_key for message in request.messages}) > 1,
    ),
    Rule(
        "at most 1,000 messages per request",
        grpc.StatusCode.INVALID_ARGUMENT,
        "The value for message_count is too large. You passed 1001 in the request, but the maximum value is 1000.",
        QUOTAS,
        lambda request: len(request.messages) > 1000,
    ),
    # The 10 MB message limit needs no rule of its own: such a message makes its request larger than 10 MB.
    Rule(
        "at most 10 MB per request",
        grpc.StatusCode.INVALID_ARGUMENT,
        "Request payload size exceeds the limit: 10000000 bytes.",
        QUOTAS,
        lambda request: request.ByteSize() > 10_000_000,
    ),
    Rule(
        "data or at least one attribute",
        grpc.StatusCode.INVALID_ARGUMENT,
        "Some messages are empty: a message needs data or at least one attribute.",
        "https://cloud.google.com/pubsub/docs/reference/rest/v1/PubsubMessage",
        _any_message(lambda m: not m.data and not m.attributes),
    ),
    Rule(
        "ordering key at most 1 KB",
        grpc.StatusCode.INVALID_ARGUMENT,
        "An ordering key is too long: at most 1024 bytes.",
        QUOTAS,
        _any_message(lambda m: _size(m.ordering_key) > 1024),
    ),
    Rule(
        "at most 100 attributes",
        grpc.StatusCode.INVALID_ARGUMENT,
        "Too many attributes: at most 100 per message.",
        QUOTAS,
        _any_message(lambda m: len(m.attributes) > 100),
    ),
    Rule(
        "attribute key at most 256 bytes",
        grpc.StatusCode.INVALID_ARGUMENT,
        "An attribute key is too long: at most 256 bytes.",
        QUOTAS,
        _any_attribute(lambda key, value: _size(key) > 256),
    ),
    Rule(
        "attribute value at most 1,024 bytes",
        grpc.StatusCode.INVALID_ARGUMENT,
        "An attribute value is too long: at most 1024 bytes.",
        QUOTAS,
        _any_attribute(lambda key, value: _size(value) > 1024),
    ),
    Rule(
        "attribute keys do not start with goog",
        grpc.StatusCode.INVALID_ARGUMENT,
        "Attribute keys must not start with 'goog'.",
        QUOTAS,
        _any_attribute(lambda key, value: key.lower().startswith("goog")),
    ),
)

# "If messages have ordering keys, the maximum publisher throughput is 1 MB/s per ordering key" (quotas page),
# counted on the published PubsubMessages. Google documents neither how it measures the rate nor the status of a
# key that goes faster. This layer measures it as a rate with one second's burst (a token bucket of 1 MB filling
# at 1 MB/s: a strict one-second window would refuse a sender under the limit whose requests merely arrive
# unevenly), and answers RESOURCE_EXHAUSTED, the code the installed client's Publish retry settings treat as
# "slow down" (google/pubsub_v1/services/publisher/transports/base.py). Not checked against the service.
KEY_RATE = Rule(
    "at most 1 MB/s per ordering key",
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Publish throughput for an ordering key exceeds 1 MB/s.",
    QUOTAS + " (publisher throughput)",
    lambda request: False,  # needs the layer's clock: see ConformanceLayer._over_key_rate
)
KEY_BYTES_PER_SECOND = 1_000_000


def _same(data: bytes) -> bytes:
    return data


class _Passthrough(grpc.GenericRpcHandler):
    def __init__(self, layer: PubSubConformanceLayer) -> None:
        self.layer = layer

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        service, _, name = method.strip("/").rpartition("/")
        if service not in SERVICES:
            return None
        if name in STREAMING:
            return grpc.stream_stream_rpc_method_handler(self.layer.stream(method), _same, _same)
        return grpc.unary_unary_rpc_method_handler(self.layer.unary(method, check=name == "Publish"), _same, _same)


class PubSubConformanceLayer:
    """A gRPC proxy: Publish is checked against RULES and KEY_RATE; every other call is forwarded unchanged."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.round_trip_seconds = 0.0  # latency model (the benchmark): added to every Publish
        self.refusals: list[str] = []  # rule names, in the order refused
        self.requests = 0  # Publish requests seen
        self.keys_per_request: list[int] = []
        self.key_history: dict[str, list[tuple[float, int]]] = defaultdict(list)  # accepted: (arrival, bytes)
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (bytes it may still send, when last filled)
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream, options=[("grpc.max_send_message_length", 64 * 1024**2)])
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            options=[("grpc.max_receive_message_length", 64 * 1024**2)],
        )
        self._server.add_generic_rpc_handlers((_Passthrough(self),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.host = f"127.0.0.1:{self.port}"

    def unary(self, method: str, check: bool) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        forward = self._channel.unary_unary(method, _same, _same)

        def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
            if check:
                time.sleep(self.round_trip_seconds)
                refused = self.refusal(_Request.FromString(raw))
                if refused is not None:
                    context.abort(refused.code, refused.message)
            try:
                return bytes(forward(raw, metadata=context.invocation_metadata(), timeout=context.time_remaining()))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
                raise  # unreachable: abort raises

        return handle

    def stream(self, method: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        forward = self._channel.stream_stream(method, _same, _same)

        def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            call = forward(requests, metadata=context.invocation_metadata())
            context.add_callback(call.cancel)
            try:
                yield from (bytes(answer) for answer in call)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    context.abort(exc.code(), exc.details() or "")

        return handle

    def refusal(self, request: Any) -> Rule | None:
        """The first rule this request breaks (recorded), or None; a request that passes counts for its key."""
        with self._lock:
            self.requests += 1
            self.keys_per_request.append(len({message.ordering_key for message in request.messages}))
            broken = next((rule for rule in RULES if rule.broken_by(request)), None)
            if broken is None and self._over_key_rate(request):
                broken = KEY_RATE
            if broken is not None:
                self.refusals.append(broken.name)
        return broken

    def _over_key_rate(self, request: Any) -> bool:
        key = request.messages[0].ordering_key if request.messages else ""
        if not key:
            return False
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (float(KEY_BYTES_PER_SECOND), now))
        tokens = min(float(KEY_BYTES_PER_SECOND), tokens + (now - stamp) * KEY_BYTES_PER_SECOND)
        size = sum(message.ByteSize() for message in request.messages)
        if size > tokens:
            self._buckets[key] = (tokens, now)
            return True
        self._buckets[key] = (tokens - size, now)
        self.key_history[key].append((now, size))
        return False

    def most_bytes_in_a_second(self, key: str) -> int:
        """The most message bytes of one key that arrived within any one second."""
        history = self.key_history.get(key, [])
        return max((sum(b for t, b in history if start <= t < start + 1.0) for start, _ in history), default=0)

    def reset(self) -> None:
        with self._lock:
            self.refusals.clear()
            self.requests = 0
            self.keys_per_request.clear()
            self.key_history.clear()
            self._buckets.clear()

    def start(self) -> PubSubConformanceLayer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()
