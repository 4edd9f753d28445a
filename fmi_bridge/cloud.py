"""Google clients, built once from the configuration; emulator hosts switch to anonymous credentials."""

from __future__ import annotations

import warnings
from typing import Any

import google.auth
import google.pubsub_v1 as pubsub_gapic
import grpc
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import bigquery, bigquery_storage_v1
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from fmi_bridge.config import Config


def publisher_client(config: Config) -> Any:
    """The generated Publisher client: Publish RPCs as the senders batch them, no client-side batching,
    sequencing or futures (the spool already orders and batches)."""
    return _pubsub_client(config, pubsub_gapic.PublisherClient, PublisherGrpcTransport)


def subscriber_client(config: Config) -> Any:
    """For provision --subscription: the same endpoint (or emulator) as the publisher."""
    return _pubsub_client(config, pubsub_gapic.SubscriberClient, SubscriberGrpcTransport)


def _pubsub_client(config: Config, client: Any, transport: Any) -> Any:
    options = {"client_options": {"api_endpoint": config.pubsub_endpoint}} if config.pubsub_endpoint else {}
    return client(**(emulator_transport(config.pubsub_emulator_host, transport) or options))


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


def bigquery_write_client(config: Config) -> Any:
    """The Storage Write API client; the emulator's gRPC port when BIGQUERY_STORAGE_EMULATOR_HOST is set."""
    return bigquery_storage_v1.BigQueryWriteClient(  # type: ignore[no-untyped-call]
        **emulator_transport(config.bigquery_storage_emulator_host, BigQueryWriteGrpcTransport)
    )


HOW_TO_SUPPLY_CREDENTIALS = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run where the platform provides a "
    "service account (App Engine, workload identity), or run `gcloud auth application-default login`"
)


def credentials_problem(config: Config) -> str | None:
    """None when every cloud sink has what it needs (emulators need no credentials), else one line on how to
    supply Application Default Credentials."""
    needed = (config.pubsub_enabled and not config.pubsub_emulator_host) or (
        config.bigquery_enabled and not config.bigquery_emulator_host
    )
    if not needed:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the library's own warning line would come before ours
            google.auth.default()
    except DefaultCredentialsError as exc:
        return f"no Google credentials for APP_ENV={config.app_env}: {HOW_TO_SUPPLY_CREDENTIALS} ({exc})"
    return None
