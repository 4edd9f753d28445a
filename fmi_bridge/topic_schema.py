"""The KPI event as the topic's Pub/Sub schema: Avro (schemas/kpi_event.avsc), JSON encoding, so messages stay
readable and every message is checked by the service (cloud.google.com/pubsub/docs/schemas: a topic with a
schema refuses a message that does not match it). What `provision` creates and `check-config` compares."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1 import SchemaServiceClient
from google.pubsub_v1.services.schema_service.transports import SchemaServiceGrpcTransport
from google.pubsub_v1.types import Encoding, Schema, SchemaSettings

from fmi_bridge import APP_DIR
from fmi_bridge.config import Config

AVRO_FILE = APP_DIR / "schemas" / "kpi_event.avsc"


def definition() -> str:
    return AVRO_FILE.read_text()


def schema_path(config: Config) -> str:
    return f"projects/{config.gcp_project_id}/schemas/{config.pubsub_schema}"


def schema_client(config: Config) -> Any:
    """The schema service ignores PUBSUB_EMULATOR_HOST (googleapis/python-pubsub#647): the emulator explicitly."""
    if config.pubsub_emulator_host:
        channel = grpc.insecure_channel(config.pubsub_emulator_host)
        return SchemaServiceClient(
            transport=SchemaServiceGrpcTransport(channel=channel, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        )
    if config.pubsub_endpoint:
        return SchemaServiceClient(client_options={"api_endpoint": config.pubsub_endpoint})
    return SchemaServiceClient()


JSON = Encoding.JSON


def settings(config: Config) -> SchemaSettings:
    return SchemaSettings(schema=schema_path(config), encoding=JSON)


def same_shape(first: str, second: str) -> bool:
    """Two Avro definitions with the same record fields (names, types, order); docs and spacing aside."""

    def fields(text: str) -> list[tuple[str, Any]]:
        return [(field["name"], field["type"]) for field in json.loads(text).get("fields", [])]

    try:
        return fields(first) == fields(second)
    except (ValueError, AttributeError, KeyError, TypeError):
        return False


def avro_schema() -> Schema:
    return Schema(type_=Schema.Type.AVRO, definition=definition())
