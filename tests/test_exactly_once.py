"""Exactly once into BigQuery with the Storage Write API: a batch that landed but was never recorded as sent
(the spool's disk full at that moment), then kill -9, then a restart: the resend carries the same stream
offsets, the stream answers ALREADY_EXISTS, and the table holds one row per reading. Rows are counted, not
distinct ids."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PROJECT, Cloud, PubSubEndpoint, make_cloud, start_bridge, write_layer
from tests.sinks.bigquery_write_conformance import EMULATOR_LOCK, WriteApiConformance
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    Published,
    ResendingPublisher,
    bq_query,
    expected_ids,
    publish,
    reading,
    readings,
    wait_until,
)
from tests.test_spool_safety import fill, small_disk

pytestmark = pytest.mark.slow


@pytest.fixture
def cloud(own_cloud: Cloud) -> Cloud:
    """Here each test has a BigQuery emulator of its own (one is stopped), behind the Write API layer."""
    return own_cloud


def test_kill_9_between_append_and_settle_leaves_exactly_one_row_per_reading(
    broker: Broker,
    cloud: Cloud,
    own_bigquery: BigQueryEmulator,
    bridges: Callable[..., Bridge],
    tmp_path: Path,
) -> None:
    assert own_bigquery.process is not None
    with small_disk(tmp_path / "disk", 40) as disk:
        spool = disk / "spool"
        env = {
            "SPOOL_DIR": str(spool),
            "SPOOL_MIN_FREE_BYTES": str(1024**2),
            "SINK_TIMEOUT_SECONDS": "2",
        }
        bridge = start_bridge(bridges, cloud, broker, **env)
        first = readings(["S1", "S2"], 5)
        publish(broker.port, first)
        # Sent, not "nothing owed": owed is 0 too before the first reading reaches the spool.
        wait_until(
            lambda: bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"') == len(first), 30, "warm-up rows"
        )
        opened = [e["lane"] for e in bridge.log_entries() if e.get("message") == "opened a BigQuery write stream"]
        assert opened == ["bigquery/readings"]  # no stream for the rejects table, which has nothing to write

        own_bigquery.process.send_signal(signal.SIGSTOP)  # BigQuery hangs: the next appends time out
        rest = readings(["S1", "S2"], 150, start=5)
        publish(broker.port, rest)
        wait_until(
            lambda: bridge.metric("fmi_bridge_lane_failed_total", 'lane="bigquery/readings"') >= 1, 30, "a timeout"
        )
        (spool / "spool.db.reserve").unlink()
        filler = fill(disk)  # now nothing can be recorded in the spool
        own_bigquery.process.send_signal(signal.SIGCONT)

        wait_until(
            lambda: bridge.metric("fmi_bridge_settle_failed_total", 'sink="bigquery"') > 0, 60, "a landed append"
        )
        bridge.kill()  # kill -9: the spool still says those rows are owed
        filler.unlink()
        bridge.start()
        bridge.wait_ready()

        wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 90, "everything settled after the restart")
    table = cloud.readings_table
    assert bq_query(cloud.bq, f"SELECT count(*) AS n FROM `{table}`")[0]["n"] == len(first + rest)
    assert {row[0] for row in bq_query(cloud.bq, f"SELECT event_id FROM `{table}`")} == expected_ids(first + rest)


def test_readings_and_rejects_go_through_their_write_streams(
    broker: Broker,
    cloud: Cloud,
    bridges: Callable[..., Bridge],
) -> None:
    bridge = start_bridge(bridges, cloud, broker)
    good = readings(["S1", "S2", "S3"], 400)
    bad = [Published("FCTS/FAE/S1/SolvExtract/T", b"not json %d" % n) for n in range(30)]

    publish(broker.port, good + bad)

    # Settled first, queried after: a query during an append can deadlock the emulator (not BigQuery).
    wait_until(lambda: bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"') == len(good + bad), 60, "sent")
    # "sent" counts the answer; the spool records it a moment later
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') == 0, 30, "settled")
    rows = bq_query(cloud.bq, f"SELECT event_id, timestamp FROM `{cloud.readings_table}`")
    assert len(rows) == len(good) and {row["event_id"] for row in rows} == expected_ids(good)
    assert {row["timestamp"].year for row in rows} == {2026}  # timestamps as the Write API's microseconds
    rejects = bq_query(cloud.bq, f"SELECT reason FROM `{cloud.rejects_table}`")
    assert [row["reason"] for row in rejects] == ["bad_json"] * len(bad)
    assert '"opened a BigQuery write stream"' in bridge.output()


def test_rows_the_write_api_refuses_go_to_the_rejects_table_and_the_rest_land_once(
    broker: Broker,
    cloud: Cloud,
    write_api: WriteApiConformance,
    bridges: Callable[..., Bridge],
) -> None:
    write_api.refuse = b"s-refused"
    bridge = start_bridge(bridges, cloud, broker)
    first = readings(["S1", "S2"], 100)
    refused = [reading(site, seq, sensor="s-refused") for seq in range(100, 105) for site in ("S1", "S2")]
    later = readings(["S1", "S2"], 20, start=200)
    good = first + later

    def settled(count: int) -> bool:
        sent = bridge.metric("fmi_bridge_sink_sent_total", 'sink="bigquery"')
        return sent >= count and bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') == 0

    publish(broker.port, first[:100] + refused + first[100:])
    wait_until(lambda: settled(len(first) + len(refused)), 60, "the first rows settled")
    assert len(write_api.refused("injected")) == len(refused)  # each refused row once, in one append
    # The next batch must continue the stream where the re-offset batch ended: a gap would lose the stream.
    publish(broker.port, later)
    wait_until(lambda: settled(len(good) + len(refused)), 60, "the later rows settled")
    assert "write stream lost" not in bridge.output()
    # Counted rows, not distinct ids: the batches re-offset after a refusal must not have landed twice.
    rows = bq_query(cloud.bq, f"SELECT event_id FROM `{cloud.readings_table}`")
    assert sorted(row["event_id"] for row in rows) == sorted(expected_ids(good))
    rejects = bq_query(cloud.bq, f"SELECT event_id, reason, detail FROM `{cloud.rejects_table}`")
    assert {row["event_id"] for row in rejects} == expected_ids(refused) and len(rejects) == len(refused)
    assert {row["reason"] for row in rejects} == {"bigquery_rejected"}
    assert all("field value refused" in row["detail"] for row in rejects)
    assert bridge.metric("fmi_bridge_sink_dead_lettered_total", 'sink="bigquery"') == len(refused)


@pytest.fixture
def kept_bigquery(tmp_path: Path) -> Iterator[BigQueryEmulator]:
    """An emulator that keeps its rows over a restart (and, as bqemulator does, forgets its write streams)."""
    emulator = BigQueryEmulator(tmp_path / "kept", PROJECT, persistent=True)
    emulator.workdir.mkdir()
    yield emulator.start()
    emulator.stop()
    write_layer(emulator).stop()


def test_readings_delivered_again_by_the_broker_or_the_publisher_are_one_row_each(
    broker: Broker, pubsub_endpoint: PubSubEndpoint, kept_bigquery: BigQueryEmulator, bridges: Callable[..., Bridge]
) -> None:
    """While readings flow at 1,000/s: the bridge killed -9 twice (what it committed but had not acknowledged is
    delivered again), Mosquitto restarted gracefully twice (its un-acknowledged deliveries come again, and the
    publisher publishes again what the broker had not acknowledged to it), and BigQuery restarted once, the
    bridge killed just before (the write stream is lost with records that had landed unsettled: they are found
    in the table). Answers take 0.2 s on their way back, so there are appends that landed unanswered whenever the
    bridge is killed. Rows counted."""
    cloud = make_cloud(pubsub_endpoint, kept_bigquery)
    write_layer(kept_bigquery).answer_delay_seconds = 0.2
    bridge = start_bridge(bridges, cloud, broker)
    messages = readings(["S1", "S2", "S3", "S4"], 1500)
    publisher = ResendingPublisher(broker.port, messages, per_second=1000)
    publisher.start()
    duplicates = 0.0
    steps = (("kill", 0.15), ("broker", 0.3), ("bigquery", 0.45), ("kill", 0.6), ("broker", 0.75))
    for step, share in steps:
        wait_until(lambda share=share: publisher.sent >= len(messages) * share, 60, f"{share:.0%} published")
        if step == "kill":
            duplicates += bridge.metric("fmi_bridge_duplicates_total")
            bridge.kill()
            bridge.start()
            bridge.wait_ready()
        elif step == "broker":
            broker.stop()
            broker.start()
        else:
            duplicates += bridge.metric("fmi_bridge_duplicates_total")
            layer = write_layer(kept_bigquery)
            wait_until(
                lambda layer=layer: layer.landed_unanswered > 0, 30, "an append landed and not yet answered", 0.01
            )
            bridge.kill()  # with it in flight: its records are on the stream, unsettled in the spool
            with EMULATOR_LOCK:  # not mid-query: the suite's queries take it too
                kept_bigquery.stop()
            kept_bigquery.start()
            bridge.start()
            bridge.wait_ready()
    publisher.join(120)
    assert publisher.error is None and not publisher.is_alive()
    wanted = expected_ids(messages)

    def rows() -> int:
        return int(bq_query(cloud.bq, f"SELECT count(*) FROM `{cloud.readings_table}`")[0][0])

    wait_until(lambda: rows() >= len(wanted), 120, "every reading in BigQuery")
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') == 0, 30, "nothing owed")
    duplicates += bridge.metric("fmi_bridge_duplicates_total")
    assert rows() == len(wanted)
    assert {row[0] for row in bq_query(cloud.bq, f"SELECT event_id FROM `{cloud.readings_table}`")} == wanted
    assert duplicates > 0 and publisher.resent > 0  # the windows were not empty: copies came, none was spooled
    looked_up = [e for e in bridge.log_entries() if e.get("message", "").startswith("records in flight on the lost")]
    assert sum(e["landed"] for e in looked_up) > 0  # the restart cost the stream with landed records unsettled
