"""The Storage Write API as Google's BigQuery takes it: the conformance layer's rules shown refusing, and the
bridge on each of them (a stream that expires, one replaced before it can, a table behind the release, a reading
that has left the partition window, a batch only partly landed before a power cut)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.cloud import bigquery as bq
from google.cloud.bigquery_storage_v1 import types

from fmi_bridge import cloud as cloud_clients
from fmi_bridge.assembly import open_spool
from fmi_bridge.commands.provision import SCHEMAS, provision, table_resource
from fmi_bridge.config import Config
from fmi_bridge.events import reading_row
from fmi_bridge.partition_window import PartitionWindow
from fmi_bridge.readings import Inbound, Reading, validate
from fmi_bridge.sinks.bigquery_write import RowEncoder
from fmi_bridge.sinks.bigquery_write_errors import Meaning, Refusal
from fmi_bridge.sinks.contract import BIGQUERY
from fmi_bridge.spool import READING, entry
from tests.conftest import PROJECT, Cloud, PubSubEndpoint, cloud_env, start_bridge
from tests.sinks.bigquery_proxy import BigQueryProxy
from tests.sinks.bigquery_write_conformance import REQUEST_LIMIT, WriteApiConformance
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    Published,
    bq_query,
    expected_ids,
    publish,
    readings,
    wait_until,
)
from tests.test_spool_safety import command

pytestmark = pytest.mark.slow

ENCODER = RowEncoder(SCHEMAS / "bigquery_readings.json")


@pytest.fixture
def cloud(own_cloud: Cloud) -> Cloud:
    """Here each test has a BigQuery emulator of its own, behind the Write API layer (`write_api`)."""
    return own_cloud


def row_of(message: Published, received_at: datetime | None = None) -> dict[str, Any]:
    outcome = validate(Inbound(message.topic, message.payload, received_at or datetime.now(UTC)))
    assert isinstance(outcome, Reading), outcome
    return reading_row(outcome)


def append(client: Any, stream: str, rows: list[bytes], offset: int, encoder: RowEncoder = ENCODER) -> Any:
    request = types.AppendRowsRequest(
        write_stream=stream,
        offset=offset,
        proto_rows=types.AppendRowsRequest.ProtoData(
            writer_schema=types.ProtoSchema(proto_descriptor=encoder.descriptor),
            rows=types.ProtoRows(serialized_rows=rows),
        ),
    )
    call = client.append_rows(iter([request]), retry=None, timeout=30)
    try:
        return next(iter(call))
    finally:
        call.cancel()


def new_stream(client: Any, table: str) -> str:
    project, dataset, name = table.split(".")
    parent = f"projects/{project}/datasets/{dataset}/tables/{name}"
    made = client.create_write_stream(
        parent=parent, write_stream=types.WriteStream(type_=types.WriteStream.Type.COMMITTED), timeout=30
    )
    return str(made.name)


def writer(cloud: Cloud) -> Any:
    """A Write API client of the test's own, through the layer, as the bridge's."""
    return cloud_clients.bigquery_write_client(Config.from_env(cloud.env))


def settled(bridge: Bridge, count: int) -> bool:
    sent = bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"')
    return sent >= count and bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') == 0


def row_count(cloud: Cloud) -> list[str]:
    return sorted(row["event_id"] for row in bq_query(cloud.bq, f"SELECT event_id FROM `{cloud.readings_table}`"))


# -- the layer's rules, each shown refusing -------------------------------------------------------------------


@pytest.mark.bigquery_refusals
def test_the_layer_refuses_what_bigquery_refuses_with_its_codes_and_details(
    cloud: Cloud, write_api: WriteApiConformance, tmp_path: Path
) -> None:
    client = writer(cloud)
    stream = new_stream(client, cloud.readings_table)
    good = ENCODER.encode(row_of(readings(["S1"], 1)[0]))

    # A writer schema with a field the table lacks: SCHEMA_MISMATCH_EXTRA_FIELDS, which the bridge reads.
    resource = json.loads((SCHEMAS / "bigquery_readings.json").read_text())
    resource["schema"]["fields"].append({"name": "unit", "type": "STRING", "mode": "NULLABLE"})
    (tmp_path / "newer.json").write_text(json.dumps(resource))
    newer = RowEncoder(tmp_path / "newer.json")
    answer = append(client, stream, [newer.encode({**row_of(readings(["S1"], 1)[0]), "unit": "m3/h"})], 0, newer)
    refusal = Refusal.of(answer.error.code, answer.error.message, answer.error.details)
    assert refusal.code == 3 and refusal.meaning is Meaning.SCHEMA and "extra fields: unit" in refusal.describe()

    # A row outside the partition window: a row error, and the stream takes none of the append.
    old = Published(
        "FCTS/FAE/S1/SolvExtract/T",
        json.dumps({"site_code": "S1", "sensor_id": "s", "timestamp": "2000-01-01T00:00:00Z", "value": 1}).encode(),
    )
    wide = validate(Inbound(old.topic, old.payload, datetime.now(UTC)), PartitionWindow(100_000, 366))
    assert isinstance(wide, Reading)
    answer = append(client, stream, [good, ENCODER.encode(reading_row(wide))], 0)
    assert [error.index for error in answer.row_errors] == [1]
    assert "outside the allowed bounds" in answer.row_errors[0].message
    assert append(client, stream, [good], 0).append_result.offset == 0  # offset 0 was still free

    # The request size limit.
    big = ENCODER.encode({**row_of(readings(["S1"], 1)[0]), "payload": "x" * (REQUEST_LIMIT + 1)})
    assert append(client, stream, [big], 1).error.code == 3

    # A stream without traffic for longer than its time to live: INVALID_ARGUMENT with STREAM_NOT_FOUND.
    write_api.stream_ttl_seconds = 0.5
    time.sleep(1)
    answer = append(client, stream, [good], 1)
    refusal = Refusal.of(answer.error.code, answer.error.message, answer.error.details)
    assert refusal.code == 3 and refusal.meaning is Meaning.STREAM_GONE

    assert [rule for rule, _ in write_api.refusals] == [
        "writer schema fields",
        "partition window",
        "request size",
        "stream time to live",
    ]
    assert row_count(cloud) == sorted(expected_ids(readings(["S1"], 1)))  # only the one good append


# -- the bridge on each rule ----------------------------------------------------------------------------------


@pytest.mark.bigquery_refusals
def test_an_expired_stream_is_replaced_and_every_row_lands_once(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    """The status code (INVALID_ARGUMENT) alone says "retry"; the StorageError detail says the stream is gone."""
    write_api.stream_ttl_seconds = 3  # long enough for a loaded machine to use a new stream within it
    bridge = start_bridge(bridges, cloud, broker)
    first, later = readings(["S1", "S2"], 10), readings(["S1", "S2"], 10, start=10)
    publish(broker.port, first)
    wait_until(lambda: settled(bridge, len(first)), 30, "the first rows")
    time.sleep(4)  # the stream expires

    publish(broker.port, later)

    wait_until(lambda: settled(bridge, len(first + later)), 30, "the later rows on a new stream")
    assert len(write_api.refused("stream time to live")) == 1
    lost = [e for e in bridge.log_entries() if e.get("message") == "BigQuery write stream lost; opening a new one"]
    assert len(lost) == 1 and "STREAM_NOT_FOUND" in lost[0]["error"]
    assert row_count(cloud) == sorted(expected_ids(first + later))  # counted: none twice, none lost


def test_an_idle_stream_is_replaced_before_it_can_expire(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    """Not marked: a refusal by the layer (the stream met expired) fails this test."""
    write_api.stream_ttl_seconds = 3
    env = {"BIGQUERY_STREAM_MAX_IDLE_SECONDS": "1.5"}
    bridge = start_bridge(bridges, cloud, broker, **env)
    first, later = readings(["S1"], 5), readings(["S1"], 5, start=5)
    publish(broker.port, first)
    wait_until(lambda: settled(bridge, len(first)), 30, "the first rows")
    time.sleep(4)  # longer than the layer's time to live; idle, the bridge makes no stream

    publish(broker.port, later)

    wait_until(lambda: settled(bridge, len(first + later)), 30, "the later rows")
    opened = [e for e in bridge.log_entries() if e.get("message") == "opened a BigQuery write stream"]
    assert [e["why"] for e in opened] == ["first use", "unused for more than 1.5 s"]
    assert row_count(cloud) == sorted(expected_ids(first + later))


@pytest.mark.bigquery_refusals
def test_a_table_behind_the_release_is_named_once_and_provision_cures_it(
    broker: Broker,
    pubsub_endpoint: PubSubEndpoint,
    own_bigquery: BigQueryEmulator,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    env = {**cloud_env(pubsub_endpoint, own_bigquery), "MQTT_PORT": str(broker.port)}
    config = Config.from_env(env)
    client = own_bigquery.client()
    client.create_dataset(f"{PROJECT}.{config.bigquery_dataset}")
    older = table_resource(config, "readings", "bigquery_readings.json")
    older["schema"]["fields"] = [f for f in older["schema"]["fields"] if f["name"] != "payload"]  # a release ago
    client.create_table(bq.Table.from_api_repr(older))
    client.create_table(bq.Table.from_api_repr(table_resource(config, "readings_rejected", "bigquery_rejects.json")))
    bridge = bridges(env).start()
    bridge.wait_ready()
    messages = readings(["S1"], 20)
    publish(broker.port, messages)

    named = wait_until(
        lambda: [e for e in bridge.log_entries() if e.get("message", "").startswith("BigQuery refuses every append")],
        30,
        "the refusal named",
    )
    wait_until(lambda: len(write_api.refused("writer schema fields")) >= 3, 30, "retried with backoff")
    assert len(named) == 1  # once, however often the append is retried
    assert named[0]["severity"] == "ERROR" and "extra fields: payload" in named[0]["error"]
    assert "provision" in named[0]["action"]

    provision(config)

    wait_until(lambda: settled(bridge, len(messages)), 60, "the rows, once the table has the column")
    rows = bq_query(client, f"SELECT event_id, payload FROM `{PROJECT}.{config.bigquery_dataset}.readings`")
    assert sorted(row["event_id"] for row in rows) == sorted(expected_ids(messages))
    assert all(row["payload"] for row in rows)


@pytest.mark.bigquery_refusals
def test_a_reading_that_left_the_partition_window_is_dead_lettered_and_the_lane_goes_on(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    """A window wider than the service's (as if the reading had aged in the spool): BigQuery refuses that row
    alone; it goes to the rejects table, and the readings around it land."""
    env = {"BIGQUERY_PARTITION_DAYS_PAST": "4000"}
    bridge = start_bridge(bridges, cloud, broker, **env)
    stale_day = (datetime.now(UTC) - timedelta(days=2000)).strftime("%Y-%m-%dT00:00:00Z")
    stale = Published(
        "FCTS/FAE/S1/SolvExtract/T",
        json.dumps({"site_code": "S1", "sensor_id": "s", "timestamp": stale_day, "value": 1}).encode(),
    )
    good = readings(["S1", "S2"], 30)

    publish(broker.port, [*good[:30], stale, *good[30:]])

    wait_until(lambda: settled(bridge, len(good) + 1), 60, "every row settled")
    assert len(write_api.refused("partition window")) == 1
    assert row_count(cloud) == sorted(expected_ids(good))
    rejects = bq_query(cloud.bq, f"SELECT event_id, reason, detail FROM `{cloud.rejects_table}`")
    assert [(row["event_id"], row["reason"]) for row in rejects] == [(*expected_ids([stale]), "bigquery_rejected")]
    assert "outside the allowed bounds" in rejects[0]["detail"]
    assert cloud.reader.wait_for(len(good) + 1, timeout=30) == expected_ids([*good, stale])  # Pub/Sub had it


def test_a_batch_only_partly_landed_before_a_power_cut_is_completed_not_settled_short(
    broker: Broker,
    cloud: Cloud,
    bridges: Callable[..., Bridge],
    tmp_path: Path,
) -> None:
    """The spool as a power cut can leave it: an append of the first 10 records landed at offsets 0-9, but the
    assignment of those offsets was rolled back, so all 20 records are owed from offset 0 on the same stream.
    The resend of 20 at offset 0 is answered ALREADY_EXISTS; settling all 20 on it would lose rows 10-19."""
    env = {
        **cloud.env,
        "MQTT_PORT": str(broker.port),
        "SPOOL_DIR": str(tmp_path / "spool"),
    }
    config = Config.from_env(env)
    messages = readings(["S1"], 20)
    rows = [row_of(message) for message in messages]
    client = writer(cloud)
    stream = new_stream(client, cloud.readings_table)
    landed = append(client, stream, [ENCODER.encode(row) for row in rows[:10]], 0)
    assert landed.append_result.offset == 0 and not landed.row_errors

    spool = open_spool(config)
    spool.append([entry(READING, row["site_code"], row) for row in rows])
    spool.start_write_stream(f"{config.mqtt_client_id}:{cloud.readings_table}", stream, BIGQUERY, READING, time.time())
    spool.release()

    bridge = bridges(env).start()
    wait_until(lambda: settled(bridge, len(messages)), 60, "the batch settled")

    assert row_count(cloud) == sorted(expected_ids(messages))  # 20 rows, each once
    completed = [e for e in bridge.log_entries() if e.get("message", "").startswith("an earlier send had landed")]
    assert [(e["landed"], e["written"]) for e in completed] == [(10, 10)]


def lane_key(config: Config, table: str) -> str:
    return f"{config.mqtt_client_id}:{table}"


def spool_with_landed_half(cloud: Cloud, env: dict[str, str], count: int) -> tuple[list[Published], str]:
    """The spool as a bridge killed mid-append leaves it: `count` records holding offsets 0.. on a stream, the
    first half of them landed, none settled. Returns the messages and the stream."""
    config = Config.from_env(env)
    messages = readings(["S1"], count)
    rows = [row_of(message) for message in messages]
    client = writer(cloud)
    stream = new_stream(client, cloud.readings_table)
    spool = open_spool(config)
    spool.append([entry(READING, row["site_code"], row) for row in rows])
    key = lane_key(config, cloud.readings_table)
    spool.start_write_stream(key, stream, BIGQUERY, READING, time.time())
    assert len(spool.offset_batch(key, BIGQUERY, READING, count, 10**9)) == count
    landed = append(client, stream, [ENCODER.encode(row) for row in rows[: count // 2]], 0)
    assert landed.append_result.offset == 0 and not landed.row_errors
    spool.release()
    return messages, stream


def test_records_in_flight_on_a_lost_stream_are_looked_up_not_written_twice(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """Someone finalizes the stream (one way Google's service loses it for the bridge) after half of an append's
    records landed and before any was settled: those are found in the table, the rest go on a new stream."""
    env = {**cloud.env, "MQTT_PORT": str(broker.port), "SPOOL_DIR": str(tmp_path / "spool")}
    messages, stream = spool_with_landed_half(cloud, env, 40)
    writer(cloud).finalize_write_stream(name=stream, timeout=30)

    bridge = bridges(env).start()
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 60, "every record settled")

    assert row_count(cloud) == sorted(expected_ids(messages))  # 40 rows counted: none twice (60 without)
    looked_up = [e for e in bridge.log_entries() if e.get("message", "").startswith("records in flight on the lost")]
    assert [(e["landed"], e["written_again"]) for e in looked_up] == [(20, 20)]


def test_a_lookup_the_service_refuses_holds_the_records_and_names_the_role(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """The lookup needs bigquery.jobs.create: refused, nothing is sent on a new stream (that could write rows
    twice) and nothing is dropped; one ERROR names the role; granted, the lane goes on by itself."""
    proxy = BigQueryProxy(cloud.env["BIGQUERY_EMULATOR_HOST"]).start()
    proxy.faults.deny_queries = True
    env = {
        **cloud.env,
        "MQTT_PORT": str(broker.port),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "BIGQUERY_EMULATOR_HOST": proxy.url,
    }
    try:
        messages, stream = spool_with_landed_half(cloud, env, 20)
        writer(cloud).finalize_write_stream(name=stream, timeout=30)
        bridge = bridges(env).start()
        wait_until(lambda: proxy.faults.queries >= 3, 60, "the lookup refused again and again")
        errors = [e for e in bridge.log_entries() if e.get("severity") == "ERROR"]
        assert len(errors) == 1 and "roles/bigquery.jobUser" in errors[0]["action"], errors
        assert bridge.metric("fmi_bridge_spool_records") == len(messages)  # all kept, none dropped
        assert len(row_count(cloud)) == len(messages) // 2  # nothing written meanwhile
        assert bridge.metric("fmi_bridge_lane_failed_total", 'lane="bigquery/readings",code="PERMISSION_DENIED"') >= 1

        proxy.faults.deny_queries = False
        wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 60, "every record, once granted")
        assert row_count(cloud) == sorted(expected_ids(messages))
    finally:
        proxy.stop()


def test_probes_against_a_slow_service_keep_the_lane_alive_and_settle_as_they_go(
    broker: Broker, cloud: Cloud, write_api: WriteApiConformance, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """2,000 records owed from offset 0 (a power cut took back their assignment), the first 1,000 landed: the
    append at 0 is answered ALREADY_EXISTS and the stream's end is found by probes, each a round trip of 1.5 s
    here: about twelve of them, longer than LIVENESS_STALL_SECONDS. Liveness stays green throughout, and what
    the probes prove landed is settled as they go, not at the end of the round."""
    env = {
        **cloud.env,
        "MQTT_PORT": str(broker.port),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "BIGQUERY_APPENDS_IN_FLIGHT": "1",
        "SINK_TIMEOUT_SECONDS": "5",
        "LIVENESS_STALL_SECONDS": "10",
    }
    config = Config.from_env(env)
    messages = readings(["S1", "S2"], 1000)
    rows = [row_of(message) for message in messages]
    client = writer(cloud)
    stream = new_stream(client, cloud.readings_table)
    assert not append(client, stream, [ENCODER.encode(row) for row in rows[:1000]], 0).row_errors
    spool = open_spool(config)
    spool.append([entry(READING, row["site_code"], row) for row in rows])
    spool.start_write_stream(lane_key(config, cloud.readings_table), stream, BIGQUERY, READING, time.time())
    spool.release()
    write_api.round_trip_seconds = 1.5

    bridge = bridges(env).start()
    bridge.wait_ready()
    owed: set[float] = set()
    liveness: list[int] = []

    def done() -> bool:
        liveness.append(bridge.status("/liveness_check")[0])
        owed.add(bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"'))
        return bridge.metric("fmi_bridge_spool_records") == 0

    wait_until(done, 120, "every record settled", interval=0.5)
    assert set(liveness) == {200}, liveness
    assert owed & set(range(1, len(messages))), owed  # settled in steps as probes proved rows landed
    assert write_api.passed_appends >= 10  # the probes (and the rest) did take that many round trips
    assert row_count(cloud) == sorted(expected_ids(messages))


# -- the connection ----------------------------------------------------------------------------------------------


def test_appends_share_one_connection_which_is_reopened_after_the_service_closes_it_idle(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    write_api.idle_close_seconds = 1.5
    bridge = start_bridge(bridges, cloud, broker, BIGQUERY_APPEND_ROWS="50")
    first, later = readings(["S1", "S2"], 500), readings(["S1", "S2"], 20, start=500)
    publish(broker.port, first)
    wait_until(lambda: settled(bridge, len(first)), 60, "the first rows")
    assert write_api.connections == 1 and write_api.passed_appends >= len(first) // 50  # many appends, one connection

    wait_until(lambda: write_api.idle_closed == 1, 10, "the layer closing the idle connection")
    publish(broker.port, later)

    wait_until(lambda: settled(bridge, len(first + later)), 30, "the later rows, on a new connection")
    assert write_api.connections == 2
    assert bridge.metric("fmi_bridge_lane_failed_total", 'lane="bigquery/readings",code="ERROR"') == 0  # not a failure
    assert row_count(cloud) == sorted(expected_ids(first + later))


def test_spool_import_keeps_exactly_once_for_appends_the_source_had_sent(
    broker: Broker,
    cloud: Cloud,
    bridges: Callable[..., Bridge],
    tmp_path: Path,
) -> None:
    """The source spool as a bridge killed after an append landed leaves it: 20 records with offsets on its
    stream, in the table, not yet settled. Imported without them, they would be written a second time."""
    env = {**cloud.env, "MQTT_PORT": str(broker.port)}
    old, live = tmp_path / "old", tmp_path / "live"
    source_config = Config.from_env({**env, "SPOOL_DIR": str(old)})
    messages = readings(["S1", "S2"], 10)
    rows = [row_of(message) for message in messages]
    client = writer(cloud)
    stream = new_stream(client, cloud.readings_table)
    source = open_spool(source_config)
    source.append([entry(READING, row["site_code"], row) for row in rows])
    key = f"{source_config.mqtt_client_id}:{cloud.readings_table}"
    source.start_write_stream(key, stream, BIGQUERY, READING, time.time())
    given = source.offset_batch(key, BIGQUERY, READING, 100, 10**9)
    assert [record.offset for record in given] == list(range(20))
    assert append(client, stream, [ENCODER.encode(record.row) for record in given], 0).append_result.offset == 0
    source.release()

    imported = command({**env, "SPOOL_DIR": str(live)}, "spool-import", str(old / "spool.db"))
    assert imported.returncode == 0, imported.stderr
    bridge = bridges({**env, "SPOOL_DIR": str(live)}).start()
    wait_until(lambda: settled(bridge, len(messages)), 60, "the imported records settled")

    assert row_count(cloud) == sorted(expected_ids(messages))  # counted: each row once, not twice
    assert cloud.reader.wait_for(len(messages), 30) == expected_ids(messages)


def test_large_rows_go_in_appends_under_the_request_limit(
    broker: Broker,
    cloud: Cloud,
    bridges: Callable[..., Bridge],
) -> None:
    """400 readings of 30 KB: the default 2,000 rows an append would be 12 MB. Not marked: an append over the
    layer's 10 MB fails the test."""
    bridge = start_bridge(bridges, cloud, broker)
    pad = "x" * 30_000
    big = [
        Published(m.topic, json.dumps({**json.loads(m.payload), "pad": pad}).encode()) for m in readings(["S1"], 400)
    ]
    publish(broker.port, big)

    wait_until(lambda: settled(bridge, len(big)), 90, "every large row")
    assert row_count(cloud) == sorted(expected_ids(big))
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == 0


def test_a_silent_service_costs_a_timeout_and_a_new_connection_not_a_thread_each_time(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    bridge = start_bridge(bridges, cloud, broker, SINK_TIMEOUT_SECONDS="1")
    assert bridge.process is not None
    write_api.silent.set()
    messages = readings(["S1", "S2"], 20)
    publish(broker.port, messages)

    def timeouts() -> float:
        return bridge.metric("fmi_bridge_lane_failed_total", 'lane="bigquery/readings",code="ERROR"')

    wait_until(lambda: timeouts() >= 2, 60, "the first timeouts")
    threads = threads_of(bridge.process.pid)
    wait_until(lambda: timeouts() >= 4, 90, "more timeouts")
    assert threads_of(bridge.process.pid) <= threads + 1  # a connection a timeout, closed: no thread left behind
    write_api.silent.clear()

    wait_until(lambda: settled(bridge, len(messages)), 60, "every row once the service answers")
    assert row_count(cloud) == sorted(expected_ids(messages))


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_an_append_refused_whole_without_a_detail_is_one_error_naming_what_to_do(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    """Waiting cannot cure it, so an operator must hear of it; the lane goes on by itself once it is cured."""
    write_api.refuse_whole = b"S1"
    bridge = start_bridge(bridges, cloud, broker)
    messages = readings(["S1"], 10)
    publish(broker.port, messages)

    def errors() -> list[dict[str, Any]]:
        return [e for e in bridge.log_entries() if e.get("message", "").startswith("BigQuery refuses every append")]

    wait_until(lambda: len(write_api.refused("injected")) >= 3, 30, "the append refused again and again")
    assert len(errors()) == 1  # once, however often it is retried
    assert errors()[0]["severity"] == "ERROR" and "the append is refused" in errors()[0]["error"]
    assert "provision" in errors()[0]["action"]
    write_api.refuse_whole = None

    wait_until(lambda: settled(bridge, len(messages)), 60, "the rows, once it is cured")
    assert row_count(cloud) == sorted(expected_ids(messages))
