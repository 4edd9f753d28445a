"""Create the Pub/Sub topic, the dataset and both tables from the shipped schema files; safe to run again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery import Dataset, Table

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


def provision(config: Config, publisher: Any = None, bigquery: Any = None) -> list[str]:
    """Return what was created or found, one line each."""
    done: list[str] = []
    if config.pubsub_enabled:
        publisher = publisher or cloud.publisher_client(config)
        path = cloud.topic_path(config)
        try:
            publisher.create_topic(name=path)
            done.append(f"created topic {path}")
        except api_exceptions.AlreadyExists:
            done.append(f"topic {path} exists")
    if config.bigquery_enabled:
        bigquery = bigquery or cloud.bigquery_client(config)
        bigquery.create_dataset(Dataset(f"{config.gcp_project_id}.{config.bigquery_dataset}"), exists_ok=True)
        done.append(f"dataset {config.bigquery_dataset} ready")
        for table, schema_file in (
            (config.bigquery_table, "bigquery_readings.json"),
            (config.bigquery_rejects_table, "bigquery_rejects.json"),
        ):
            assert table is not None  # Config requires it wherever BigQuery is on
            bigquery.create_table(Table.from_api_repr(table_resource(config, table, schema_file)), exists_ok=True)
            done.append(f"table {config.bigquery_dataset}.{table} ready")
        view = latest_view(config)
        bigquery.create_table(view, exists_ok=True)
        done.append(f"view {config.bigquery_dataset}.{view.table_id} ready")
    for line in done:
        log.info(line)
    return done
