"""Google clients, built once from the configuration; emulator hosts switch to anonymous credentials."""

from __future__ import annotations

from typing import Any

import grpc
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, if_exception_type
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, pubsub_v1  # type: ignore[attr-defined]  # mypy cannot see pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

from fmi_bridge.config import Config

# The publish errors worth retrying inside the client; with ordering on, the client retries them without end.
_RETRYABLE = if_exception_type(
    api_exceptions.Aborted,
    api_exceptions.Cancelled,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.ServiceUnavailable,
    api_exceptions.Unknown,
)


def publisher_client(config: Config) -> Any:
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=5_000_000, max_latency=0.05),
        publisher_options=pubsub_v1.types.PublisherOptions(
            enable_message_ordering=True,
            retry=Retry(predicate=_RETRYABLE, initial=0.1, maximum=5.0, multiplier=2.0),
        ),
        **(
            emulator_transport(config.pubsub_emulator_host, PublisherGrpcTransport)
            or ({"client_options": {"api_endpoint": config.pubsub_endpoint}} if config.pubsub_endpoint else {})
        ),
    )


def emulator_transport(host: str | None, transport: Any) -> dict[str, Any]:
    """The configured emulator, explicitly: an insecure channel to it and no credentials."""
    if host is None:
        return {}
    return {"transport": transport(channel=grpc.insecure_channel(host), credentials=AnonymousCredentials())}  # type: ignore[no-untyped-call]


def topic_path(config: Config) -> str:
    return f"projects/{config.gcp_project_id}/topics/{config.pubsub_topic}"


def bigquery_client(config: Config) -> Any:
    if config.bigquery_emulator_host:
        return bigquery.Client(
            project=config.gcp_project_id,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": config.bigquery_emulator_host},
        )
    return bigquery.Client(project=config.gcp_project_id)


def table_id(config: Config, table: str | None) -> str:
    return f"{config.gcp_project_id}.{config.bigquery_dataset}.{table}"
