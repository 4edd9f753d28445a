"""Create the Pub/Sub topic, the dataset and both tables from the shipped schema files; safe to run again."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery import DEFAULT_RETRY, Dataset, Table

from fmi_bridge import cloud
from fmi_bridge.config import Config

log = logging.getLogger(__name__)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def table_resource(config: Config, table: str, schema_file: str) -> dict[str, Any]:
    resource: dict[str, Any] = json.loads((SCHEMAS / schema_file).read_text())
    resource["tableReference"] = {
        "projectId": config.gcp_project_id,
        "datasetId": config.bigquery_dataset,
        "tableId": table,
    }
    return resource


def latest_view(config: Config) -> Table:
    """One row per event_id (its first arrival), for readers of a table written at least once (insert_all)."""
    table = cloud.table_id(config, config.bigquery_table)
    view = Table(f"{table}_latest")
    view.view_query = (
        f"SELECT * EXCEPT (arrival) FROM (SELECT *, ROW_NUMBER() OVER "
        f"(PARTITION BY event_id ORDER BY received_at) AS arrival FROM `{table}`) WHERE arrival = 1"
    )
    return view


SETUP_TIMEOUT_SECONDS = 10.0  # an endpoint that does not answer in this long is reported, not waited for


class ProvisionError(Exception):
    """A service did not answer or refused; the message names the endpoint and the variable that sets it."""


def provision(config: Config, publisher: Any = None, bigquery: Any = None) -> list[str]:
    """Return what was created or found, one line each."""
    done: list[str] = []
    if not (config.pubsub_enabled or config.bigquery_enabled):
        done.append(f"nothing to provision: APP_ENV={config.app_env} with no emulator host writes to the log only")
    if config.pubsub_enabled:
        with _answering("Pub/Sub", config.pubsub_emulator_host, "PUBSUB_EMULATOR_HOST"):
            done += _provision_pubsub(config, publisher or cloud.publisher_client(config))
    if config.bigquery_enabled:
        with _answering("BigQuery", config.bigquery_emulator_host, "BIGQUERY_EMULATOR_HOST"):
            done += _provision_bigquery(config, bigquery or cloud.bigquery_client(config))
    for line in done:
        log.info(line)
    return done


@contextmanager
def _answering(service: str, emulator: str | None, variable: str) -> Iterator[None]:
    try:
        yield
    except (api_exceptions.GoogleAPIError, OSError) as exc:  # requests' errors are OSErrors
        where = f"{emulator} ({variable})" if emulator else "Google Cloud"
        raise ProvisionError(f"{service} at {where}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _provision_pubsub(config: Config, publisher: Any) -> list[str]:
    path = cloud.topic_path(config)
    try:
        publisher.create_topic(name=path, retry=None, timeout=SETUP_TIMEOUT_SECONDS)
    except api_exceptions.AlreadyExists:
        return [f"topic {path} exists"]
    return [f"created topic {path}"]


def _provision_bigquery(config: Config, bigquery: Any) -> list[str]:
    limits = {"retry": DEFAULT_RETRY.with_deadline(SETUP_TIMEOUT_SECONDS), "timeout": SETUP_TIMEOUT_SECONDS}
    dataset = Dataset(f"{config.gcp_project_id}.{config.bigquery_dataset}")
    bigquery.create_dataset(dataset, exists_ok=True, **limits)
    done = [f"dataset {config.bigquery_dataset} ready"]
    for table, schema_file in (
        (config.bigquery_table, "bigquery_readings.json"),
        (config.bigquery_rejects_table, "bigquery_rejects.json"),
    ):
        assert table is not None  # Config requires it wherever BigQuery is on
        resource = Table.from_api_repr(table_resource(config, table, schema_file))
        bigquery.create_table(resource, exists_ok=True, **limits)
        done.append(f"table {config.bigquery_dataset}.{table} ready")
    view = latest_view(config)
    bigquery.create_table(view, exists_ok=True, **limits)
    done.append(f"view {config.bigquery_dataset}.{view.table_id} ready")
    return done
