"""Sinks and tables that never block each other, the outage budget an operator sees, health checks an idle
client cannot starve, BigQuery batches within its request limit, and a stop inside the platform's window."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from google.cloud import bigquery as bq

from fmi_bridge.commands.provision import table_resource
from fmi_bridge.health import REQUEST_TIMEOUT_SECONDS
from tests.conftest import Cloud, start_bridge
from tests.sinks.bigquery_proxy import BigQueryProxy
from tests.sinks.pubsub_server import Faults
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    Published,
    bq_distinct_ids,
    bq_query,
    expected_ids,
    publish,
    reading,
    readings,
    wait_until,
)

pytestmark = pytest.mark.slow

SITES = ["S1", "S2"]
T = "FCTS/FAE/S1/SolvExtract/TAG"


def bad(n: int) -> Published:
    return Published(T, b"not json %d" % n)


def test_a_missing_rejects_table_holds_up_no_reading(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    cloud.bq.delete_table(cloud.rejects_table)  # not provisioned, or no grant: BigQuery answers 404
    bridge = start_bridge(bridges, cloud, broker)
    rejects = [bad(n) for n in range(600)]
    good = readings(SITES, 500)

    publish(broker.port, rejects + good)  # 600 rejects ahead of the readings in the spool

    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(good), 60, "every reading")
    assert bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') == len(rejects)
    hint = next(e for e in bridge.log_entries() if e.get("message") == "sink unavailable")
    assert hint["sink"] == "bigquery/rejects" and "provision` creates it" in hint["error"]
    assert bridge.metric("fmi_bridge_lane_failed_total", 'lane="bigquery/rejects"') >= 1

    cloud.bq.create_table(
        bq.Table.from_api_repr(table_resource(cloud.config, "readings_rejected", "bigquery_rejects.json"))
    )

    wait_until(
        lambda: bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.rejects_table}`")[0]["n"] == len(rejects),
        60,
        "the rejects, once the table exists",
    )
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "an empty spool")


def test_a_failing_readings_table_holds_up_no_reject(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    cloud.bq.delete_table(cloud.readings_table)
    bridge = start_bridge(bridges, cloud, broker)
    good, rejects = readings(SITES, 300), [bad(n) for n in range(50)]

    publish(broker.port, good + rejects)

    wait_until(
        lambda: bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.rejects_table}`")[0]["n"] == len(rejects),
        60,
        "the rejects while the readings table is missing",
    )
    assert cloud.reader.wait_for(len(good), 30) == expected_ids(good)  # Pub/Sub unaffected too
    cloud.bq.create_table(bq.Table.from_api_repr(table_resource(cloud.config, "readings", "bigquery_readings.json")))
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(good), 60, "the readings")
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "an empty spool")


def test_the_outage_budget_is_visible_in_metrics_and_in_the_stats_line(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker, STATS_LOG_SECONDS="1", SINK_LAG_WARN_SECONDS="2")
    faults.unavailable = True
    messages = readings(SITES, 200)

    publish(broker.port, messages)

    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(messages), 30, "owed")
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') == 0, 30, "BigQuery done")
    assert bridge.metric("fmi_bridge_sink_owed_bytes", 'sink="pubsub"') == bridge.metric("fmi_bridge_spool_bytes") > 0
    warning = wait_until(
        lambda: [e for e in bridge.log_entries() if e.get("message", "").startswith("sink is falling behind")],
        30,
        "the lag warning",
    )[0]
    assert warning["sink"] == "pubsub" and warning["owed_records"] == len(messages)
    assert warning["severity"] == "WARNING" and warning["oldest_age_seconds"] > 2
    assert bridge.metric("fmi_bridge_sink_oldest_owed_age_seconds", 'sink="pubsub"') > 2
    stats = wait_until(  # a stats line written after BigQuery finished
        lambda: [e for e in bridge.log_entries() if e.get("message") == "stats" and e["sent"]["bigquery"]][-1:],
        10,
        "a stats line with BigQuery done",
    )[0]
    assert stats["owed_records"] == {"pubsub": len(messages), "bigquery": 0}
    assert stats["received"] == stats["accepted"] == len(messages) and stats["rejected"] == 0
    assert stats["sent"]["bigquery"] == len(messages) and stats["sent"]["pubsub"] == 0
    assert stats["spool_bytes"] == stats["owed_bytes"]["pubsub"]

    faults.unavailable = False
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == 0, 60, "caught up")
    wait_until(lambda: any(e.get("message") == "sink caught up" for e in bridge.log_entries()), 10, "the recovery")
    recovered = [e for e in bridge.log_entries() if e.get("message") == "sink recovered"]
    assert recovered and all(e["sink"].startswith("pubsub") and e["down_seconds"] > 2 for e in recovered)
    drained = wait_until(
        lambda: [e for e in bridge.log_entries() if e.get("message") == "spool drained after a backlog"], 15, "drained"
    )
    assert drained[0]["peak_records"] >= len(messages) and drained[0]["backlog_seconds"] > 2


def test_time_to_full_follows_the_intake_rate(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge]
) -> None:
    asked = time.monotonic()
    bridge = start_bridge(bridges, cloud, broker, STATS_LOG_SECONDS="1", SPOOL_MAX_BYTES=str(64 * 1024**2))
    ready = time.monotonic()
    faults.unavailable = True
    assert bridge.metric("fmi_bridge_spool_seconds_to_full") == float("inf")  # nothing comes in yet
    for start in range(0, 1200, 200):
        publish(broker.port, readings(SITES, 100, start=start))
        time.sleep(1)
    left = wait_until(
        lambda: (
            0 < bridge.metric("fmi_bridge_spool_seconds_to_full") < float("inf")
            and bridge.metric("fmi_bridge_spool_seconds_to_full")
        ),
        20,
        "a finite time to full",
    )
    # The bridge's rate is what it spooled since it started (under a minute ago) over that time: bound that time
    # by when the test asked it to start and when it was ready, and the answer lies between the two.
    now = time.monotonic()
    room = 64 * 1024**2 - bridge.metric("fmi_bridge_spool_bytes")
    spooled = bridge.metric("fmi_bridge_spooled_bytes_total")
    left = bridge.metric("fmi_bridge_spool_seconds_to_full")
    shortest, longest = room * (now - ready) / spooled, room * (now - asked) / spooled
    assert shortest * 0.7 < left < longest * 1.3, (shortest, left, longest)  # 1 s sampling at each end of ~10 s


@pytest.fixture
def idle_client(request: pytest.FixtureRequest) -> Iterator[Callable[[int], socket.socket]]:
    opened: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        sock.close()


def test_an_idle_connection_never_delays_a_probe(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], idle_client: Callable[[int], socket.socket]
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    idle_client(bridge.port)  # connects and sends nothing
    half = idle_client(bridge.port)
    half.sendall(b"GET /liveness_check HTTP/1.1\r\nHost: x\r\n")  # and one that stops mid-request

    took = []
    for _ in range(10):
        started = time.monotonic()
        assert bridge.status("/liveness_check") == (200, "ok\n")
        took.append(time.monotonic() - started)
    # A probe held behind an idle client would wait out its 5 s socket timeout; 2.5 s is the margin for a loaded
    # machine, half of that.
    assert max(took) < REQUEST_TIMEOUT_SECONDS / 2, took
    assert bridge.status("/readiness_check")[0] == 200


# insertAll's own rules (its 10 MB request limit, whole-request 400s, per-row reasons), through a proxy that can
# produce them (the bridges of these tests use insertAll; the suite's default is the Storage Write API).
@pytest.fixture
def bigquery_proxy(bigquery: BigQueryEmulator) -> Iterator[BigQueryProxy]:
    proxy = BigQueryProxy(bigquery.url).start()
    yield proxy
    proxy.stop()


def test_large_payloads_stay_under_the_request_limit(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all"
    )
    pad = "x" * 30_000  # 500 such rows (the default batch) would be 15 MB
    big = [Published(m.topic, json.dumps({**json.loads(m.payload), "pad": pad}).encode()) for m in readings(SITES, 400)]

    publish(broker.port, big)

    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(big), 90, "every large row")
    assert cloud.reader.wait_for(len(big), 90) == expected_ids(big)  # and every one in Pub/Sub
    assert bigquery_proxy.faults.too_large == 0  # no request ever passed 10 MB...
    assert bigquery_proxy.faults.insert_calls < 20  # ...and none went row by row
    assert bigquery_proxy.faults.largest_request > 5_000_000  # while batches stayed large
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == 0


def test_transient_row_errors_are_retried_and_invalid_rows_dead_lettered(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    strict = table_resource(cloud.config, "strict", "bigquery_readings.json")
    for column in strict["schema"]["fields"]:
        if column["name"] == "sensor_id":
            column["type"] = "INT64"  # rows with a sensor_id that is no number are invalid
    cloud.bq.create_table(bq.Table.from_api_repr(strict))
    bigquery_proxy.faults.flaky = lambda row: row.get("sensor_id", "").endswith("7")
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all",
        BIGQUERY_TABLE="strict", BIGQUERY_REJECTS_TABLE="readings_rejected",
    )  # fmt: skip
    numeric = [reading(site, n, sensor=str(1000 + n)) for n in range(100) for site in SITES]
    named = [reading("S1", n, sensor="abc") for n in range(100, 110)]

    publish(broker.port, numeric + named)

    table = f"{cloud.config.gcp_project_id}.{cloud.config.bigquery_dataset}.strict"
    wait_until(lambda: bq_distinct_ids(cloud.bq, table) == expected_ids(numeric), 60, "every valid row, flaky included")
    assert len(bigquery_proxy.faults.failed) == 20 and set(bigquery_proxy.faults.failed.values()) == {2}
    rejects = wait_until(
        lambda: (rows := bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`")) and len(rows) >= 10 and rows,
        60,
        "the invalid rows as dead letters",
    )
    assert {row["event_id"] for row in rejects} == expected_ids(named)
    assert {row["reason"] for row in rejects} == {"bigquery_rejected"}
    assert bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{table}`")[0]["n"] == len(numeric)  # no row twice
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == len(named)


def test_the_insert_all_layer_refuses_a_row_outside_the_partition_window_as_bigquery_does(
    cloud: Cloud, bigquery_proxy: BigQueryProxy
) -> None:
    """Without skipInvalidRows the service takes none of the request: the row outside says why, the other is
    `stopped`; with it, only the row outside is refused."""
    project, dataset, table = cloud.readings_table.split(".")
    url = f"{bigquery_proxy.url}/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}/insertAll"
    rows = [
        {"insertId": "old", "json": {"event_id": "old", "timestamp": "2000-01-01T00:00:00Z"}},
        {"insertId": "new", "json": {"event_id": "new", "timestamp": datetime.now(UTC).isoformat()}},
    ]

    def insert(**options: bool) -> list[tuple[int, str]]:
        body = json.dumps({"rows": rows, **options}).encode()
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        return [(error["index"], error["errors"][0]["reason"]) for error in answer.get("insertErrors", [])]

    assert insert() == [(0, "invalid"), (1, "stopped")]
    assert bq_distinct_ids(cloud.bq, cloud.readings_table) == set()
    assert insert(skipInvalidRows=True) == [(0, "invalid")]
    assert bq_distinct_ids(cloud.bq, cloud.readings_table) == {"new"}


def test_a_reading_that_left_the_partition_window_is_dead_lettered_by_insert_all_too(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    """A window wider than the service's, as if the reading had aged in the spool: insertAll refuses that row
    alone (skipInvalidRows), and it goes to the rejects table."""
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all",
        BIGQUERY_PARTITION_DAYS_PAST="4000",
    )  # fmt: skip
    day = (datetime.now(UTC) - timedelta(days=2000)).strftime("%Y-%m-%dT00:00:00Z")
    stale = Published(T, json.dumps({"site_code": "S1", "sensor_id": "s", "timestamp": day, "value": 1}).encode())
    good = readings(SITES, 20)

    publish(broker.port, [*good[:40], stale, *good[40:]])

    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(good), 60, "the good rows")
    rejects = wait_until(lambda: bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`"), 60, "the dead letter")
    assert [(row["event_id"], row["reason"]) for row in rejects] == [(*expected_ids([stale]), "bigquery_rejected")]
    assert "outside the allowed bounds" in rejects[0]["detail"]
    assert bigquery_proxy.faults.window_refused == 1
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == 1


def test_a_request_refused_whole_is_narrowed_down_by_halving(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    bigquery_proxy.faults.spoils_request = lambda row: row.get("sensor_id") == "SPOILER"
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all"
    )
    messages = readings(SITES, 250)
    spoiler = reading("S2", 125, sensor="SPOILER")
    messages[messages.index(reading("S2", 125))] = spoiler

    publish(broker.port, messages)

    good = [m for m in messages if m != spoiler]
    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(good), 60, "the other rows")
    rejects = wait_until(lambda: bq_query(cloud.bq, f"SELECT * FROM `{cloud.rejects_table}`"), 30, "the dead letter")
    assert [(r["reason"], r["event_id"]) for r in rejects] == [("bigquery_rejected", *expected_ids([spoiler]))]
    assert bigquery_proxy.faults.insert_calls < 40  # about 2 log2(500) requests, not one per row
    assert bridge.alive()


@pytest.mark.parametrize("fault", ["slow", "down"])
def test_the_whole_stop_fits_its_deadline(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge], fault: str
) -> None:
    bridge = start_bridge(bridges, cloud, broker, SHUTDOWN_FLUSH_SECONDS="6", SINK_TIMEOUT_SECONDS="30")
    if fault == "slow":
        faults.latency_seconds = 3.0  # every publish takes 3 s: the flush cannot finish
    else:
        faults.unavailable = True
    publish(broker.port, readings(SITES, 2000))
    wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") == 4000, 30, "intake")

    started = time.monotonic()
    assert bridge.terminate(timeout=60) == 0
    took = time.monotonic() - started

    # The bridge's own stop sequence keeps SHUTDOWN_FLUSH_SECONDS (6 here), read from its own log clock (0.5 s
    # margin for the last log line); the whole exit stays inside what Supervisor waits (stopwaitsecs=28).
    entries = bridge.log_entries()
    stopping = next(e for e in entries if e.get("message", "").startswith("stopping"))
    stopped = [e for e in entries if e.get("message") == "stopped"][-1]
    sequence = datetime.fromisoformat(stopped["time"]) - datetime.fromisoformat(stopping["time"])
    assert sequence.total_seconds() < 6 + 0.5, sequence
    assert took < 28, took
    assert stopped["records_kept_in_spool"] > 0


def test_a_reject_row_bigquery_refuses_is_logged_in_full_and_let_go(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    """A dead letter cannot be dead-lettered again: its row goes to the log whole, and the rejects lane moves on."""
    strict = table_resource(cloud.config, "strict_rejects", "bigquery_rejects.json")
    for column in strict["schema"]["fields"]:
        if column["name"] == "reason":
            column["type"] = "INT64"  # no reason code is a number: BigQuery calls every reject row invalid
    cloud.bq.create_table(bq.Table.from_api_repr(strict))
    bridge = start_bridge(
        bridges,
        cloud,
        broker,
        BIGQUERY_EMULATOR_HOST=bigquery_proxy.url,
        BIGQUERY_WRITE_METHOD="insert_all",
        BIGQUERY_REJECTS_TABLE="strict_rejects",
    )
    bad = Published("FCTS/FAE/MOR/SolvExtract/TAG1", b"not json")
    good = readings(SITES, 5)

    publish(broker.port, [bad, *good])

    logged = wait_until(
        lambda: [e for e in bridge.log_entries() if e.get("severity") == "ERROR" and "not json" in json.dumps(e)],
        60,
        "the refused reject row in the log",
    )
    assert "bad_json" in json.dumps(logged[0])  # the whole row: reason, payload, detail
    wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "nothing left owed: let go")
    assert bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(good)


def test_batches_are_sized_as_the_client_sends_them(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    """Text outside ASCII travels as \\uXXXX escapes: 6 bytes where the spool counts 3 (CJK)."""
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all"
    )
    pad = "測" * 10_000  # 30 KB in UTF-8, 60 KB as sent
    big = [
        Published(m.topic, json.dumps({**json.loads(m.payload), "pad": pad}, ensure_ascii=False).encode())
        for m in readings(SITES, 150)
    ]

    publish(broker.port, big)

    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(big), 90, "every row")
    assert bigquery_proxy.faults.too_large == 0  # no request over 10 MB as sent
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == 0


def test_a_413_from_the_front_end_is_narrowed_down_like_a_400(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    bigquery_proxy.faults.entity_limit = 200_000  # far below what the bridge sends: every large batch answers 413
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all"
    )
    pad = "x" * 20_000
    big = [Published(m.topic, json.dumps({**json.loads(m.payload), "pad": pad}).encode()) for m in readings(SITES, 40)]

    publish(broker.port, big)

    wait_until(lambda: bq_distinct_ids(cloud.bq, cloud.readings_table) == expected_ids(big), 90, "every row")
    assert bigquery_proxy.faults.entity_refused > 0
    rows = bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{cloud.readings_table}`")[0]["n"]
    assert rows == len(big)  # each once: a 413 wrote nothing
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == 0


def test_a_stalled_loop_fails_liveness_naming_it_and_recovers(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge], bigquery_proxy: BigQueryProxy
) -> None:
    """A send that hangs (inside its deadline) holds its sender: past LIVENESS_STALL_SECONDS the platform is told,
    by name, so App Engine can restart the instance; once the send returns, liveness is green again."""
    bridge = start_bridge(
        bridges, cloud, broker, BIGQUERY_EMULATOR_HOST=bigquery_proxy.url, BIGQUERY_WRITE_METHOD="insert_all",
        SINK_TIMEOUT_SECONDS="60", LIVENESS_STALL_SECONDS="10",
    )  # fmt: skip
    assert bridge.status("/liveness_check") == (200, "ok\n")
    bigquery_proxy.faults.latency_seconds = 15.0  # every insertAll hangs this long, within its 60 s deadline

    publish(broker.port, readings(SITES, 5))

    _, body = wait_until(lambda: (s := bridge.status("/liveness_check"))[0] == 503 and s, 30, "liveness 503")
    assert "sender-bigquery/readings" in body
    bigquery_proxy.faults.latency_seconds = 0.0
    wait_until(lambda: bridge.status("/liveness_check") == (200, "ok\n"), 30, "liveness green again")
