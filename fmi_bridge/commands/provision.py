"""Create the Pub/Sub topic, the dataset and both tables from the shipped schema files; safe to run again.

A table that exists gets the columns the schema files have and it lacks (a release that adds a column); a column
of another type or mode is named, never changed (BigQuery cannot retype a column in place, and dropping one
would lose data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery import DEFAULT_RETRY, Dataset, SchemaField, Table

from fmi_bridge import APP_DIR, cloud, topic_schema
from fmi_bridge.config import Config

SCHEMAS = APP_DIR / "schemas"


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


class ProvisionError(Exception):
    """A service did not answer or refused; the message names the endpoint and the variable that sets it."""


SUBSCRIPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


def provision(
    config: Config, publisher: Any = None, bigquery: Any = None, subscription: str | None = None
) -> list[str]:
    """Return what was created or found, one line each. `subscription`: also an ordered subscription of that
    name on the topic, for a downstream consumer."""
    done: list[str] = []
    if not (config.pubsub_enabled or config.bigquery_enabled):
        done.append(f"nothing to provision: APP_ENV={config.app_env} with no emulator host writes to the log only")
    if config.pubsub_enabled:
        with _answering("Pub/Sub", config.pubsub_emulator_host, "PUBSUB_EMULATOR_HOST"):
            done += _provision_pubsub(config, publisher or cloud.publisher_client(config))
            if subscription:
                done += _provision_subscription(config, cloud.subscriber_client(config), subscription)
    if config.bigquery_enabled:
        with _answering("BigQuery", config.bigquery_emulator_host, "BIGQUERY_EMULATOR_HOST"):
            done += _provision_bigquery(config, bigquery or cloud.bigquery_client(config))
    return done


@contextmanager
def _answering(service: str, emulator: str | None, variable: str) -> Iterator[None]:
    try:
        yield
    except (api_exceptions.GoogleAPIError, OSError) as exc:  # requests' errors are OSErrors
        where = f"{emulator} ({variable})" if emulator else "Google Cloud"
        raise ProvisionError(f"{service} at {where}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _provision_pubsub(config: Config, publisher: Any) -> list[str]:
    """The KPI event's schema, then the topic with it. An existing topic is never changed: what it has is said,
    and how to give it this release's schema."""
    done = _provision_schema(config, topic_schema.schema_client(config))
    path = cloud.topic_path(config)
    timeout = config.setup_timeout_seconds
    try:
        publisher.create_topic(
            request={"name": path, "schema_settings": topic_schema.settings(config)}, retry=None, timeout=timeout
        )
    except api_exceptions.AlreadyExists:
        return [*done, f"topic {path} exists; {schema_state(config, publisher)}"]
    return [*done, f"created topic {path} with schema {topic_schema.schema_path(config)} (JSON encoding)"]


def _provision_schema(config: Config, schemas: Any) -> list[str]:
    path = topic_schema.schema_path(config)
    try:
        schemas.create_schema(
            parent=f"projects/{config.gcp_project_id}",
            schema=topic_schema.avro_schema(),
            schema_id=config.pubsub_schema,
            retry=None,
            timeout=config.setup_timeout_seconds,
        )
    except api_exceptions.AlreadyExists:
        existing = schemas.get_schema(name=path, retry=None, timeout=config.setup_timeout_seconds)
        if topic_schema.same_shape(existing.definition, topic_schema.definition()):
            return [f"schema {path} exists, as this release's"]
        return [
            f"schema {path} exists with other fields; left as it is: commit this release's as a revision "
            f"(gcloud pubsub schemas commit {config.pubsub_schema} --type=avro "
            "--definition-file=schemas/kpi_event.avsc) once consumers take it"
        ]
    return [f"created schema {path} (Avro, schemas/kpi_event.avsc)"]


def schema_state(config: Config, publisher: Any) -> str:
    """The topic's schema against this release's, in one phrase (check-config and provision say it)."""
    topic = publisher.get_topic(topic=cloud.topic_path(config), retry=None, timeout=config.setup_timeout_seconds)
    wanted = topic_schema.schema_path(config)
    attach = (
        f"to give it this release's: gcloud pubsub topics update {config.pubsub_topic} --schema={wanted} "
        "--message-encoding=json"
    )
    if not topic.schema_settings.schema:
        return f"it has no schema, so Pub/Sub checks no message; left as it is ({attach})"
    if topic.schema_settings.schema != wanted:
        return f"its schema is {topic.schema_settings.schema}, not {wanted}; left as it is ({attach})"
    if topic.schema_settings.encoding != topic_schema.JSON:
        return f"its schema {wanted} is set with {topic.schema_settings.encoding.name} encoding, not JSON ({attach})"
    return f"its schema is this release's {wanted} (JSON encoding)"


def _provision_subscription(config: Config, subscriber: Any, name: str) -> list[str]:
    """Ordered by site_code like the publishes; an existing one is checked, since neither its topic nor its
    ordering can be changed afterwards."""
    path = f"projects/{config.gcp_project_id}/subscriptions/{name}"
    topic = cloud.topic_path(config)
    limits = {"retry": None, "timeout": config.setup_timeout_seconds}
    try:
        subscriber.create_subscription(
            request={"name": path, "topic": topic, "enable_message_ordering": True, "ack_deadline_seconds": 60},
            **limits,
        )
    except api_exceptions.AlreadyExists:
        existing = subscriber.get_subscription(subscription=path, **limits)
        if existing.topic != topic or not existing.enable_message_ordering:
            raise ProvisionError(
                f"subscription {path} exists on {existing.topic} with message ordering "
                f"{'on' if existing.enable_message_ordering else 'off'}; neither can be changed: choose another name"
            ) from None
        return [f"subscription {path} exists (ordered, on {topic})"]
    return [f"created subscription {path} (ordered by site_code, on {topic})"]


def _provision_bigquery(config: Config, bigquery: Any) -> list[str]:
    wait = config.setup_timeout_seconds  # an endpoint that does not answer in this long is reported, not waited for
    limits = {"retry": DEFAULT_RETRY.with_deadline(wait), "timeout": wait}
    dataset = Dataset(f"{config.gcp_project_id}.{config.bigquery_dataset}")
    dataset.location = config.bigquery_location  # BigQuery's default is US, and it is fixed once created
    made = bigquery.create_dataset(dataset, exists_ok=True, **limits)
    if (made.location or "").lower() != config.bigquery_location.lower():
        raise ProvisionError(
            f"dataset {config.bigquery_dataset} is in {made.location}, but BIGQUERY_LOCATION={config.bigquery_location}"
            ": a dataset's location cannot be changed; set BIGQUERY_LOCATION to match, or choose another dataset"
        )
    done = [f"dataset {config.bigquery_dataset} ready in {made.location}"]
    differences: list[str] = []
    for table, schema_file in (
        (config.bigquery_table, "bigquery_readings.json"),
        (config.bigquery_rejects_table, "bigquery_rejects.json"),
        (f"{config.bigquery_rejects_table}_replayed", "bigquery_replayed.json"),  # what `replay` re-drove
    ):
        assert table is not None  # Config requires it wherever BigQuery is on
        resource = Table.from_api_repr(table_resource(config, table, schema_file))
        existing = bigquery.create_table(resource, exists_ok=True, **limits)
        added, different = _align_schema(bigquery, existing, resource.schema, limits)
        done += [f"table {config.bigquery_dataset}.{table}: added column {column}" for column in added]
        differences += [f"{config.bigquery_dataset}.{table}.{column}" for column in different]
        done.append(f"table {config.bigquery_dataset}.{table} ready")
    view = latest_view(config)
    bigquery.create_table(view, exists_ok=True, **limits)
    done.append(f"view {config.bigquery_dataset}.{view.table_id} ready")
    if differences:
        raise ProvisionError(
            f"{'; '.join(done)}; but these columns differ from schemas/ and are not changed (a column cannot be "
            f"retyped in place): {'; '.join(differences)}"
        )
    return done


def schema_gaps(config: Config, bigquery: Any) -> dict[str, list[str]]:
    """Per existing table, the columns the schema files have and it lacks (a release ahead of `provision`)."""
    wait = config.setup_timeout_seconds
    gaps: dict[str, list[str]] = {}
    for table, schema_file in (
        (config.bigquery_table, "bigquery_readings.json"),
        (config.bigquery_rejects_table, "bigquery_rejects.json"),
    ):
        wanted = [field["name"] for field in json.loads((SCHEMAS / schema_file).read_text())["schema"]["fields"]]
        try:
            existing = bigquery.get_table(
                cloud.table_id(config, table), retry=DEFAULT_RETRY.with_deadline(wait), timeout=wait
            )
        except api_exceptions.NotFound:
            continue  # a missing table is the sink's to name (with the same remedy)
        lacking = [name for name in wanted if name not in {field.name for field in existing.schema}]
        if lacking:
            gaps[f"{config.bigquery_dataset}.{table}"] = lacking
    return gaps


_API_TYPES = {"FLOAT64": "FLOAT", "INT64": "INTEGER", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}  # the API's names
_SQL_TYPES = {api: sql for sql, api in _API_TYPES.items()}  # and standard SQL's, for the DDL


def _api_type(field: SchemaField) -> str:
    return _API_TYPES.get(field.field_type, field.field_type)


def _align_schema(
    bigquery: Any, table: Any, wanted: list[SchemaField], limits: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Add the columns `wanted` has and the table lacks, as NULLABLE (BigQuery adds no REQUIRED column to a
    table that may hold rows); return (added, columns of another type). A column provision added is NULLABLE
    where the schema file says REQUIRED: that is no difference, since the bridge always writes it."""
    have = {field.name: field for field in table.schema}
    missing = [field for field in wanted if field.name not in have]
    different = [
        f"{field.name} is {_api_type(have[field.name])}, schemas/ says {_api_type(field)}"
        for field in wanted
        if field.name in have and _api_type(have[field.name]) != _api_type(field)
    ]
    if not missing:
        return [], different
    added = [
        SchemaField(field.name, field.field_type, mode="NULLABLE", description=field.description) for field in missing
    ]
    table.schema = [*table.schema, *added]
    bigquery.update_table(table, ["schema"], **limits)
    for field in added:
        # The metadata change is all BigQuery needs; bqemulator keeps its storage apart from it and needs the
        # DDL too. On BigQuery the DDL finds the column there and does nothing (IF NOT EXISTS).
        sql_type = _SQL_TYPES.get(_api_type(field), _api_type(field))
        bigquery.query(
            f"ALTER TABLE `{table.full_table_id.replace(':', '.')}` ADD COLUMN IF NOT EXISTS {field.name} {sql_type}",
            location=table.location,
        ).result(timeout=limits["timeout"])
    return [f"{field.name} ({_api_type(field)}, NULLABLE)" for field in added], different
