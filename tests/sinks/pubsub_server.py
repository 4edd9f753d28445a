"""A small Pub/Sub server for tests: the Publisher and Subscriber gRPC services on the message types that
google-cloud-pubsub ships, reached by the real client through PUBSUB_EMULATOR_HOST.

It keeps topics and subscriptions in memory, delivers in publish order on an ordered subscription (and in no
promised order on another: each pull's batch reversed), and injects faults on Publish:
UNAVAILABLE for a while, added latency, or a chosen code (INVALID_ARGUMENT unless told) for requests a
predicate picks.

    python tests/sinks/pubsub_server.py --port 8085     (run it alone, e.g. for `make run` against emulators)
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from google.pubsub_v1 import types

PublishRequest = types.PublishRequest.pb()
PublishResponse = types.PublishResponse.pb()
Topic = types.Topic.pb()
Schema = types.Schema.pb()
Subscription = types.Subscription.pb()
PullRequest = types.PullRequest.pb()
PullResponse = types.PullResponse.pb()
ReceivedMessage = types.ReceivedMessage.pb()
PubsubMessage = types.PubsubMessage.pb()


@dataclass
class Faults:
    """What Publish does wrong now; tests change these while the bridge runs."""

    unavailable: bool = False
    latency_seconds: float = 0.0
    reject: Callable[[Any], bool] | None = None  # a PubsubMessage → True answers `reject_code`
    reject_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    publish_calls: int = 0
    refused_calls: int = 0
    largest_request: int = 0  # messages in the largest Publish request seen


@dataclass
class _Subscription:
    topic: str
    ordered: bool = False  # enable_message_ordering: publish order per key; without it, no order is promised
    queue: deque[Any] = field(default_factory=deque)
    outstanding: dict[str, Any] = field(default_factory=dict)


class PubSubState:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.topics: dict[str, Any] = {}  # name -> the Topic as created (its schema settings kept)
        self.schemas: dict[str, Any] = {}  # name -> Schema: kept and returned, not enforced (Google's emulator does)
        self.subscriptions: dict[str, _Subscription] = {}
        self.faults = Faults()
        self._ids = itertools.count(1)

    # -- Publisher ------------------------------------------------------------------------------------

    def create_topic(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            if request.name in self.topics:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Topic already exists: {request.name}")
            self.topics[request.name] = request
        return request

    def get_topic(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            if request.topic not in self.topics:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Topic not found: {request.topic}")
            return self.topics[request.topic]

    # -- SchemaService --------------------------------------------------------------------------------

    def create_schema(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = f"{request.parent}/schemas/{request.schema_id}"
        with self.lock:
            if name in self.schemas:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Schema already exists: {name}")
            schema = Schema(name=name, type_=request.schema.type_, definition=request.schema.definition)
            self.schemas[name] = schema
        return schema

    def get_schema(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            if request.name not in self.schemas:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Schema not found: {request.name}")
            return self.schemas[request.name]

    def publish(self, request: Any, context: grpc.ServicerContext) -> Any:
        faults = self.faults
        faults.publish_calls += 1
        faults.largest_request = max(faults.largest_request, len(request.messages))
        if faults.latency_seconds:
            time.sleep(faults.latency_seconds)
        if faults.unavailable:
            faults.refused_calls += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: service unavailable")
        if faults.reject is not None and any(faults.reject(message) for message in request.messages):
            faults.refused_calls += 1
            context.abort(faults.reject_code, f"injected: message refused with {faults.reject_code.name}")
        with self.lock:
            if request.topic not in self.topics:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Topic not found: {request.topic}")
            now = timestamp_pb2.Timestamp()
            now.GetCurrentTime()
            ids = []
            targets = [sub for sub in self.subscriptions.values() if sub.topic == request.topic]
            for message in request.messages:
                message_id = str(next(self._ids))
                ids.append(message_id)
                stored = PubsubMessage()
                stored.CopyFrom(message)
                stored.message_id = message_id
                stored.publish_time.CopyFrom(now)
                for sub in targets:
                    sub.queue.append(stored)
            self.lock.notify_all()
        return PublishResponse(message_ids=ids)

    # -- Subscriber -----------------------------------------------------------------------------------

    def create_subscription(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            if request.name in self.subscriptions:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"Subscription already exists: {request.name}")
            if request.topic not in self.topics:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Topic not found: {request.topic}")
            self.subscriptions[request.name] = _Subscription(request.topic, request.enable_message_ordering)
        return request

    def get_subscription(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            sub = self.subscriptions.get(request.subscription)
            if sub is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Subscription not found: {request.subscription}")
        return Subscription(name=request.subscription, topic=sub.topic, enable_message_ordering=sub.ordered)

    def pull(self, request: Any, context: grpc.ServicerContext) -> Any:
        deadline = time.monotonic() + 1.0
        with self.lock:
            sub = self.subscriptions.get(request.subscription)
            if sub is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Subscription not found: {request.subscription}")
            while not sub.queue and time.monotonic() < deadline:
                self.lock.wait(deadline - time.monotonic())
            received = []
            for _ in range(min(request.max_messages or 100, len(sub.queue))):
                message = sub.queue.popleft()
                ack_id = f"ack-{next(self._ids)}"
                sub.outstanding[ack_id] = message
                received.append(ReceivedMessage(ack_id=ack_id, message=message, delivery_attempt=1))
        if not sub.ordered:
            received.reverse()  # as the service may: only an ordered subscription keeps a key's order
        return PullResponse(received_messages=received)

    def acknowledge(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            sub = self.subscriptions.get(request.subscription)
            for ack_id in request.ack_ids if sub else ():
                sub.outstanding.pop(ack_id, None)
        return empty_pb2.Empty()

    def modify_ack_deadline(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            sub = self.subscriptions.get(request.subscription)
            for ack_id in request.ack_ids if sub else ():
                if request.ack_deadline_seconds == 0 and ack_id in sub.outstanding:
                    sub.queue.appendleft(sub.outstanding.pop(ack_id))  # nack: deliver again
        return empty_pb2.Empty()


def unary(handler: Callable[..., Any], request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=request_type.FromString,
        response_serializer=lambda message: message.SerializeToString(),
    )


class PubSubServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = PubSubState()
        s = self.state
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)]
        )
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "google.pubsub.v1.Publisher",
                    {
                        "CreateTopic": unary(s.create_topic, Topic),
                        "GetTopic": unary(s.get_topic, types.GetTopicRequest.pb()),
                        "Publish": unary(s.publish, PublishRequest),
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "google.pubsub.v1.SchemaService",
                    {
                        "CreateSchema": unary(s.create_schema, types.CreateSchemaRequest.pb()),
                        "GetSchema": unary(s.get_schema, types.GetSchemaRequest.pb()),
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "google.pubsub.v1.Subscriber",
                    {
                        "CreateSubscription": unary(s.create_subscription, Subscription),
                        "GetSubscription": unary(s.get_subscription, types.GetSubscriptionRequest.pb()),
                        "Pull": unary(s.pull, PullRequest),
                        "Acknowledge": unary(s.acknowledge, types.AcknowledgeRequest.pb()),
                        "ModifyAckDeadline": unary(s.modify_ack_deadline, types.ModifyAckDeadlineRequest.pb()),
                    },
                ),
            )
        )
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.host = f"{host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.state.faults

    def start(self) -> PubSubServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def wait(self) -> None:
        self._server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8085)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every Publish")
    options = parser.parse_args()
    server = PubSubServer(port=options.port).start()
    server.faults.latency_seconds = options.latency
    print(f"Pub/Sub test server on {server.host}", flush=True)
    server.wait()
