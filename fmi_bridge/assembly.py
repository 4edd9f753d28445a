"""The bridge's parts built from one configuration, for the entry point and the operator commands alike: the
sinks (one per lane), the spool with the sinks' bits, the Storage Write stream keys, and readiness as the parts
report it."""

from __future__ import annotations

import logging

from google.api_core.exceptions import GoogleAPIError

from fmi_bridge import cloud
from fmi_bridge.commands.provision import SCHEMAS, schema_gaps
from fmi_bridge.config import Config
from fmi_bridge.intake import Intake
from fmi_bridge.mqtt.link import MqttLink
from fmi_bridge.sinks.bigquery_insert_all import BigQuerySink, Destination, destinations
from fmi_bridge.sinks.bigquery_landed import LandedRows
from fmi_bridge.sinks.bigquery_write import RowEncoder, StorageWriteSink, stream_key
from fmi_bridge.sinks.contract import BIGQUERY, LOG, PUBSUB, LogSink, Sink
from fmi_bridge.sinks.pubsub import PubSubSink, TopicAcceptance
from fmi_bridge.spool import DedupeHorizon, Spool

log = logging.getLogger("fmi_bridge")


def write_stream_keys(config: Config) -> dict[str, tuple[str, str]] | None:
    """table -> (its lane's Storage Write stream key, the lane's record kind), as the sinks key them."""
    if not (config.bigquery_enabled and config.bigquery_write_method == "storage_write"):
        return None
    return {
        table.table: (stream_key(config.mqtt_client_id, table.table), table.kind) for table in bigquery_tables(config)
    }


def bigquery_tables(config: Config) -> tuple[Destination, Destination]:
    return destinations(
        cloud.table_id(config, config.bigquery_table), cloud.table_id(config, config.bigquery_rejects_table)
    )


def build_sinks(config: Config) -> list[Sink]:
    """One per lane: Pub/Sub's lanes (sites hashed onto them, one request per site in flight), and a BigQuery
    lane per table (readings, rejects), so a lane that fails holds up no other; with no BigQuery (plain LOCAL)
    the log sink stands in."""
    sinks: list[Sink] = []
    if config.pubsub_enabled:
        publisher = cloud.publisher_client(config)
        acceptance = TopicAcceptance()  # the lanes share what the topic takes: a topic-wide refusal holds them all
        sinks += [
            PubSubSink(
                publisher,
                cloud.topic_path(config),
                lane=lane,
                lanes=config.pubsub_lanes,
                batch_size=config.pubsub_batch_size,
                deadletter_attempts=config.pubsub_deadletter_attempts,
                timeout=config.sink_timeout_seconds,
                sites_in_flight=config.pubsub_sites_in_flight,
                key_bytes_per_second=config.pubsub_key_bytes_per_second,
                acceptance=acceptance,
            )
            for lane in range(config.pubsub_lanes)
        ]
    if config.bigquery_enabled:
        tables = bigquery_tables(config)
        batch, timeout = config.bigquery_batch_size, config.sink_timeout_seconds
        if config.bigquery_write_method == "storage_write":
            writer, reader = cloud.bigquery_write_client(config), cloud.bigquery_client(config)
            schemas = (SCHEMAS / "bigquery_readings.json", SCHEMAS / "bigquery_rejects.json")
            sinks += [
                StorageWriteSink(
                    writer,
                    table,
                    RowEncoder(schema),
                    LandedRows(reader, table, schema, location=config.bigquery_location, timeout=timeout),
                    instance=config.mqtt_client_id,
                    batch_size=config.bigquery_append_rows,
                    timeout=timeout,
                    max_idle_seconds=config.bigquery_stream_max_idle_seconds,
                    in_flight=config.bigquery_appends_in_flight,
                )
                for table, schema in zip(tables, schemas, strict=True)
            ]
        else:
            client = cloud.bigquery_client(config)
            sinks += [BigQuerySink(client, table, batch_size=batch, timeout=timeout) for table in tables]
    else:
        sinks.append(LogSink())
    return sinks


def open_spool(config: Config) -> Spool:
    bits = {bit for bit, on in ((PUBSUB, config.pubsub_enabled), (BIGQUERY, config.bigquery_enabled)) if on}
    bits |= set() if config.bigquery_enabled else {LOG}  # as build_sinks: the log stands in for BigQuery
    reading_bits = (bits & {PUBSUB, BIGQUERY}) or {LOG}
    reject_bits = {BIGQUERY} if BIGQUERY in bits else {LOG}
    spool = Spool.open(
        config.spool_dir,
        max_bytes=config.spool_max_bytes,
        min_free_bytes=config.spool_min_free_bytes,
        reading_bits=sum(reading_bits),
        reject_bits=sum(reject_bits),
        lanes={PUBSUB: config.pubsub_lanes} if PUBSUB in bits else {},
        offset_bits=BIGQUERY if BIGQUERY in bits and config.bigquery_write_method == "storage_write" else 0,
        dedupe=DedupeHorizon(config.spool_dedupe_count, config.spool_dedupe_seconds),
    )
    for bit, name in ((PUBSUB, "pubsub"), (BIGQUERY, "bigquery"), (LOG, "log")):
        if bit not in bits and (waiting := spool.count_pending(bit)):
            log.warning(
                "spool holds records for a sink this configuration does not run; they are kept",
                extra={"sink": name, "records": waiting},
            )
    return spool


def warn_of_schema_gaps(config: Config) -> None:
    """A table without a column this release writes refuses every row that has it: say so once, at start."""
    if not config.bigquery_enabled:
        return
    try:
        gaps = schema_gaps(config, cloud.bigquery_client(config))
    except (GoogleAPIError, OSError):  # a missing table or an unreachable service: the sinks say so, and how
        return
    for table, columns in gaps.items():
        log.error(
            "table lacks columns this release writes: `python mqtt_subscriber.py provision` adds them",
            extra={"table": table, "columns": columns},
        )


def readiness(link: MqttLink, intake: Intake, spool: Spool) -> str | None:
    """Why the bridge cannot take readings now, or None when it can."""
    if taken := link.session_taken:
        return taken
    if not link.connected:
        return "not connected to the MQTT broker"
    if link.subscription_refused:
        return f"the broker refused the subscription, asking again: {link.subscription_refused}"
    if not link.subscribed:
        return "not subscribed yet"
    if intake.full_reason:
        return f"spool full: {intake.full_reason}"
    return None if spool.writable() else "spool is not writable"
