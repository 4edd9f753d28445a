"""The spool on a real SQLite file: per-sink progress, dead letters, limits, and surviving a reopen."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from fmi_bridge.sinks.contract import TakeBack
from fmi_bridge.spool import READING, REJECT, DedupeHorizon, Entry, Spool, SpoolError, SpoolFullError, lane_of
from fmi_bridge.spool import entry as spool_entry
from tests.support import wait_until

PUBSUB, BIGQUERY = 1, 2


def open_spool(directory: Path, max_bytes: int = 10**9) -> Spool:
    return Spool.open(
        directory, max_bytes=max_bytes, min_free_bytes=1, reading_bits=PUBSUB | BIGQUERY, reject_bits=BIGQUERY
    )


def entry(n: int, site: str = "S1") -> Entry:
    return spool_entry(READING, site, {"event_id": f"e{n}", "n": n, "pad": "x" * 50})


def size(e: Entry) -> int:
    return e.size


def test_a_record_leaves_only_when_every_sink_confirmed(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([entry(n) for n in range(5)])
    ids = [record.id for record in spool.pending(PUBSUB, 10)]

    spool.settle(PUBSUB, ids[:3])
    assert [r.row["n"] for r in spool.pending(PUBSUB, 10)] == [3, 4]
    assert [r.row["n"] for r in spool.pending(BIGQUERY, 10)] == [0, 1, 2, 3, 4]
    assert spool.stats().records == 5

    spool.settle(BIGQUERY, ids)
    assert [r.row["n"] for r in spool.pending(BIGQUERY, 10)] == []
    assert spool.stats().records == 2


def test_a_lane_takes_only_its_own_sites_in_spool_order(tmp_path: Path) -> None:
    spool = Spool.open(
        tmp_path, max_bytes=10**9, min_free_bytes=1, reading_bits=PUBSUB | BIGQUERY, reject_bits=BIGQUERY,
        lanes={PUBSUB: 2},
    )  # fmt: skip
    sites = ("A", "B", "C", "D")
    spool.append([entry(n, site) for n in range(3) for site in sites])
    for lane in (0, 1):
        mine = [site for site in sites if lane_of(site, 2) == lane]
        assert [(r.site_code, r.row["n"]) for r in spool.pending(PUBSUB, 20, lane=lane)] == [
            (site, n) for n in range(3) for site in mine
        ]
    assert {lane_of(site, 2) for site in sites} == {0, 1}  # both lanes have sites


def test_a_dead_letter_becomes_a_reject_for_bigquery_in_the_same_step(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([entry(0)])
    (record,) = spool.pending(PUBSUB, 10)

    spool.settle(PUBSUB, [], dead_letters=[(record.id, {"reason": "pubsub_rejected", "event_id": "e0"})])

    assert spool.pending(PUBSUB, 10) == []
    waiting = spool.pending(BIGQUERY, 10)
    assert [(r.kind, r.row.get("reason")) for r in waiting] == [(READING, None), (REJECT, "pubsub_rejected")]


def test_a_full_spool_takes_what_fits_then_refuses(tmp_path: Path) -> None:
    limit = 5 * size(entry(0)) + 10
    spool = open_spool(tmp_path, max_bytes=limit)
    assert spool.append([entry(n) for n in range(10)]) == 5
    with pytest.raises(SpoolFullError, match=f"limit {limit}"):
        spool.append([entry(99)])
    spool.settle(PUBSUB, [r.id for r in spool.pending(PUBSUB, 10)])
    spool.settle(BIGQUERY, [r.id for r in spool.pending(BIGQUERY, 10)])
    assert spool.append([entry(99)]) == 1


def test_low_disk_space_refuses_records(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, max_bytes=10**9, min_free_bytes=2**62, reading_bits=3, reject_bits=2)
    with pytest.raises(SpoolFullError, match="free on disk"):
        spool.append([entry(0)])
    assert not spool.writable()


def test_records_survive_a_reopen(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([entry(n) for n in range(3)])
    spool.settle(PUBSUB, [spool.pending(PUBSUB, 1)[0].id])
    spool.release()

    again = open_spool(tmp_path)
    assert again.stats().records == 3
    assert [r.row["n"] for r in again.pending(PUBSUB, 10)] == [1, 2]
    assert again.stats().bytes == sum(size(entry(n)) for n in range(3))


def keyed(n: int) -> Entry:
    return spool_entry(READING, "S1", {"event_id": f"e{n}", "n": n}, key=f"e{n}")


def test_a_key_taken_before_is_acknowledged_not_spooled_again_across_a_reopen(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    assert spool.append([keyed(0), keyed(1), keyed(1)]) == 3  # all taken: the copy is acknowledged too
    spool.release()
    spool = open_spool(tmp_path)  # as after kill -9: the keys were committed with their records
    assert spool.append([keyed(1), keyed(2), keyed(0)]) == 3
    assert [r.row["n"] for r in spool.pending(BIGQUERY, 10)] == [0, 1, 2]
    assert spool.duplicates == 2
    spool.settle(BIGQUERY, [r.id for r in spool.pending(BIGQUERY, 10)])
    spool.settle(PUBSUB, [r.id for r in spool.pending(PUBSUB, 10)])
    assert spool.append([keyed(2)]) == 1  # sent and gone from the spool, still remembered
    assert spool.stats().records == 0


def test_keys_are_forgotten_only_past_both_the_count_and_the_time(tmp_path: Path) -> None:
    horizon = DedupeHorizon(count=3, seconds=0)
    spool = Spool.open(
        tmp_path, max_bytes=10**9, min_free_bytes=1, reading_bits=BIGQUERY, reject_bits=BIGQUERY, dedupe=horizon
    )
    for n in range(6):
        spool._pruned_at = 0.0  # the once-a-second prune, every append here
        spool.append([keyed(n)])
    spool.append([keyed(0), keyed(5)])  # e0 is past the last three: spooled again; e5 is not
    assert [r.row["n"] for r in spool.pending(BIGQUERY, 10)] == [0, 1, 2, 3, 4, 5, 0]

    remembering = Spool.open(
        tmp_path / "b",
        max_bytes=10**9,
        min_free_bytes=1,
        reading_bits=BIGQUERY,
        reject_bits=BIGQUERY,
        dedupe=DedupeHorizon(count=3, seconds=3600),
    )
    for n in range(6):
        remembering._pruned_at = 0.0
        remembering.append([keyed(n)])
    remembering.append([keyed(0)])  # past the count, but within the hour
    assert remembering.duplicates == 1


def test_a_take_back_lands_with_the_settle_of_the_same_append_or_not_at_all(tmp_path: Path) -> None:
    """Row errors: the stream took none of an append of 4; record 1 is dead-lettered, the other three get offsets
    again from the append's first. Both in one transaction: the next batch starts at the taken-back offset with
    no record left holding an offset beyond it (which the stream would refuse as OUT_OF_RANGE)."""
    spool = Spool.open(
        tmp_path, max_bytes=10**9, min_free_bytes=1, reading_bits=BIGQUERY, reject_bits=BIGQUERY, offset_bits=BIGQUERY
    )
    spool.start_write_stream("lane", "stream-1", BIGQUERY, READING, 0.0)
    spool.append([entry(n) for n in range(4)])
    batch = spool.offset_batch("lane", BIGQUERY, READING, 10, 10**9)
    assert [r.offset for r in batch] == [0, 1, 2, 3]
    bad, rest = batch[1], [r.id for r in batch if r is not batch[1]]
    back = TakeBack("lane", rest, 0)
    spool.settle(BIGQUERY, [], [(bad.id, {"reject_id": "r", "event_id": "e1"})], back)
    again = spool.offset_batch("lane", BIGQUERY, READING, 10, 10**9)
    assert [(r.row["n"], r.offset) for r in again] == [(0, 0), (2, 1), (3, 2)]


def settle_at_once(spool: Spool, settles: list[tuple[int, list[int]]]) -> list[Exception | None]:
    """Each settle from a thread of its own, all waiting for the writer together (it is held until every one
    has queued), as lanes answered at the same moment do; what each raised, or None."""
    outcome: list[Exception | None] = [None] * len(settles)

    def settle(index: int, bit: int, ids: list[int]) -> None:
        try:
            spool.settle(bit, ids)
        except Exception as exc:
            outcome[index] = exc
        finally:
            spool.close()

    threads = [threading.Thread(target=settle, args=(n, bit, ids)) for n, (bit, ids) in enumerate(settles)]
    with spool._writer:  # the writer busy (an intake commit, another lane): every settle queues behind it
        for thread in threads:
            thread.start()
        wait_until(lambda: len(spool._settles) == len(settles), 10, "every settle queued")
    for thread in threads:
        thread.join(30)
    return outcome


def owed_in_the_file(directory: Path, bit: int) -> int:
    with closing(sqlite3.connect(directory / "spool.db")) as conn:
        return int(conn.execute(f"SELECT count(*) FROM records WHERE pending & {bit}").fetchone()[0])


def test_settles_of_lanes_that_wait_together_all_land_in_one_group(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    sites = [f"S{n}" for n in range(6)]
    spool.append([entry(n, sites[n % 6]) for n in range(600)])
    records = spool.pending(PUBSUB, 600)
    by_site = [[r.id for r in records if r.site_code == site] for site in sites]

    outcome = settle_at_once(spool, [(PUBSUB, ids) for ids in by_site[:5]] + [(BIGQUERY, by_site[0])])

    assert outcome == [None] * 6
    assert owed_in_the_file(tmp_path, PUBSUB) == 100  # the sixth site's, which nobody settled
    assert owed_in_the_file(tmp_path, BIGQUERY) == 500
    assert spool.owed(PUBSUB).records == 100 and spool.owed(BIGQUERY).records == 500
    assert spool.stats().records == 500  # the first site's records left: both sinks settled them


def test_a_settle_that_fails_fails_alone_not_the_settles_grouped_with_it(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append([entry(n, f"S{n % 3}") for n in range(300)])
    records = spool.pending(PUBSUB, 300)
    by_site = [[r.id for r in records if r.site_code == f"S{n}"] for n in range(3)]
    doomed = by_site[1][7]
    with closing(sqlite3.connect(tmp_path / "spool.db")) as conn:  # a real refusal of SQLite's, for one record
        for change in ("UPDATE", "DELETE"):
            conn.execute(
                f"CREATE TRIGGER refuse_{change.lower()} BEFORE {change} ON records WHEN old.id = {doomed} "
                "BEGIN SELECT RAISE(ABORT, 'this record may not be settled'); END"
            )

    outcome = settle_at_once(spool, [(PUBSUB, ids) for ids in by_site])

    assert outcome[0] is None and outcome[2] is None
    assert isinstance(outcome[1], SpoolError) and "may not be settled" in str(outcome[1])
    assert owed_in_the_file(tmp_path, PUBSUB) == 100  # the refused settle's site, whole: nothing of it half done
    assert [r.id for r in spool.pending(PUBSUB, 300)] == by_site[1]
    assert spool.owed(PUBSUB).records == 100
