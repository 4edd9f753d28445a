"""The spool under conditions nobody designed for: locked, on a full disk at start and while running, a second
process, and the operator's commands `status` and `spool-import` on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fmi_bridge.events import reading_row
from fmi_bridge.readings import Inbound, Reading, validate
from fmi_bridge.spool import READING, Spool, entry
from tests.conftest import Cloud, start_bridge
from tests.sinks.pubsub_server import Faults
from tests.support import LOCAL_ONLY, ROOT, Bridge, Broker, expected_ids, publish, readings, wait_until

pytestmark = pytest.mark.slow

LOG_BIT = 4  # LOCAL without emulators: the log sink owes every record
NOW = datetime(2026, 11, 22, tzinfo=UTC)


@contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[Path]:
    """A size-limited tmpfs of the test's own, so 'disk full' is real and touches nothing else."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {mounted.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses more."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:  # unbuffered: closing must not flush into the full disk
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def spooled_readings(directory: Path, count: int) -> set[str]:
    """A spool made by the spool's own code, holding `count` readings owed to the log sink; returns their ids."""
    spool = Spool.open(directory, max_bytes=10**9, min_free_bytes=1, reading_bits=LOG_BIT, reject_bits=LOG_BIT)
    ids = set()
    for n in range(count):
        body = {"site_code": "MOR", "sensor_id": "FT-1", "timestamp": "2026-11-20T08:00:00Z", "value": n}
        outcome = validate(Inbound(f"FCTS/FAE/MOR/SolvExtract/T{n}", json.dumps(body).encode(), NOW))
        assert isinstance(outcome, Reading)
        spool.append([entry(READING, outcome.site_code, reading_row(outcome))])
        ids.add(outcome.event_id)
    spool.release()
    return ids


def logged_ids(bridge: Bridge) -> set[str]:
    return {e["event_id"] for e in bridge.log_entries() if e.get("message") == "reading"}


def command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "mqtt_subscriber.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def local_env(broker: Broker, spool: Path) -> dict[str, str]:
    return {**LOCAL_ONLY, "MQTT_PORT": str(broker.port), "SPOOL_DIR": str(spool)}


def test_a_locked_spool_stops_start_up_with_exit_1_and_is_left_as_it_is(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    ids = spooled_readings(spool, 50)
    holder = sqlite3.connect(spool / "spool.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # another process holds SQLite's lock, readers included
    holder.execute("BEGIN EXCLUSIVE")

    bridge = bridges(local_env(broker, spool)).start()
    assert bridge.process is not None
    assert bridge.process.wait(30) == 1
    line = next(e for e in bridge.log_entries() if e.get("message", "").startswith("cannot open the spool"))
    assert "SQLITE_BUSY" in line["error"] or "locked" in line["error"]
    assert not list(spool.glob("*.corrupt-*"))

    holder.execute("ROLLBACK")
    holder.close()
    bridge.start()  # as Supervisor would
    wait_until(lambda: logged_ids(bridge) == ids, 30, "every spooled reading sent once the lock is gone")


def test_a_second_bridge_on_the_same_spool_exits_2_naming_spool_dir(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    first = bridges(local_env(broker, spool)).start()
    first.wait_ready()
    second = bridges(local_env(broker, spool)).start()
    assert second.process is not None
    assert second.process.wait(30) == 2
    line = f"SPOOL_DIR={spool}: spool {spool} is in use by another process (pid {first.process.pid})"  # type: ignore[union-attr]
    assert line in second.output()
    assert first.alive()


def test_a_full_disk_at_start_never_moves_a_good_spool_aside(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk", 8) as disk:
        spool = disk / "spool"
        ids = spooled_readings(spool, 200)
        (spool / "spool.db.reserve").unlink(missing_ok=True)
        filler = fill(disk)

        bridge = bridges(local_env(broker, spool)).start()
        assert bridge.process is not None
        assert bridge.process.wait(30) == 1  # the documented exit: restarted by Supervisor, not run half-working
        errors = [e for e in bridge.log_entries() if e.get("severity") == "ERROR"]
        assert [e["message"] for e in errors] == ["cannot open the spool; nothing was changed, exiting to be restarted"]
        assert "SQLITE_FULL" in errors[0]["error"] or "disk" in errors[0]["error"]
        assert not list(spool.glob("*.corrupt-*"))

        filler.unlink()
        bridge.start()
        wait_until(lambda: logged_ids(bridge) == ids, 30, "the spooled readings, once there is room")
        assert not list(spool.glob("*.corrupt-*"))


def test_a_disk_that_fills_while_sending_sends_nothing_twice(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk", 40) as disk:
        bridge = start_bridge(bridges, cloud, broker, SPOOL_DIR=str(disk / "spool"), SPOOL_MIN_FREE_BYTES=str(1024**2))
        faults.unavailable = True  # Pub/Sub owes everything while the disk fills
        messages = readings(["S1", "S2"], 300)
        publish(broker.port, messages)
        wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == len(messages), 30, "all spooled")
        filler = fill(disk)

        faults.unavailable = False

        assert cloud.reader.wait_for(len(messages), 60) == expected_ids(messages)
        wait_until(lambda: bridge.metric("fmi_bridge_spool_records") == 0, 30, "the spool settled on a full disk")
        cloud.reader.pull()
        assert len(cloud.reader.messages) == len(messages)  # each sent once: confirmations were not lost
        # The fault did happen: the disk refused, and the reserve was given back so the settles could commit.
        gave_back = [e for e in bridge.log_entries() if e.get("message", "").startswith("disk is full: gave back")]
        assert len(gave_back) == 1
        assert not (disk / "spool" / "spool.db.reserve").exists()
        filler.unlink()


def test_status_reads_beside_a_running_bridge_and_import_takes_a_moved_aside_spool_once(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    old = tmp_path / "old"
    ids = spooled_readings(old, 30)
    spool = tmp_path / "spool"
    env = {**local_env(broker, spool), "PATH": "/usr/bin:/bin"}

    report = json.loads(command(env, "status").stdout)
    assert report["records"] == 0 and report["note"] == "no spool yet"

    imported = command(env, "spool-import", str(old / "spool.db"))
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["records"] == 30
    again = json.loads(command(env, "spool-import", str(old / "spool.db")).stdout)
    assert again["already_imported"] is True

    report = json.loads(command(env, "status").stdout)
    assert report["records"] == 30 and report["owed"]["log"]["records"] == 30

    bridge = bridges(local_env(broker, spool)).start()
    wait_until(lambda: logged_ids(bridge) == ids, 30, "the imported readings, sent once")
    assert len([e for e in bridge.log_entries() if e.get("message") == "reading"]) == 30
    running = command(env, "status")
    assert running.returncode == 0 and json.loads(running.stdout)["records"] == 0

    refused = command(env, "spool-import", str(old / "spool.db"))
    assert refused.returncode == 1 and "in use by another process" in refused.stderr


def test_a_spool_damaged_while_running_stops_the_bridge_and_the_next_start_moves_it_aside(
    broker: Broker, cloud: Cloud, faults: Faults, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    faults.unavailable = True  # a backlog the Pub/Sub lanes keep reading
    bridge = start_bridge(bridges, cloud, broker)
    backlog = readings(["MOR", "BAG"], 2000)
    publish(broker.port, backlog)
    wait_until(lambda: bridge.metric("fmi_bridge_sink_owed_records", 'sink="pubsub"') == len(backlog), 30, "spooled")

    spool_file = tmp_path / "spool" / "spool.db"
    with sqlite3.connect(spool_file, timeout=10) as outside:  # every page into the main file, then damage them
        wait_until(  # all but the first; a checkpoint meets a reader now and then: ask until it got through
            lambda: outside.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, 30, "a full checkpoint"
        )
    with spool_file.open("r+b") as damaged:
        damaged.seek(4096)
        damaged.write(b"\xa5" * (spool_file.stat().st_size - 4096))

    assert bridge.process is not None
    assert bridge.process.wait(60) == 1  # exits for Supervisor to restart it, instead of holding for ever
    assert any("SQLITE_CORRUPT" in json.dumps(e) for e in bridge.log_entries())

    bridge.start()
    bridge.wait_ready()
    assert list((tmp_path / "spool").glob("spool.db.corrupt-*")), "the damaged file is kept aside"
    faults.unavailable = False
    late = readings(["MOR"], 10, start=5000)
    publish(broker.port, late)
    wait_until(lambda: cloud.reader.pull() >= 0 and expected_ids(late) <= cloud.reader.distinct_ids(), 60, "new flow")


def test_an_import_goes_ahead_of_what_the_spool_holds_and_never_past_its_limit(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    old, live = tmp_path / "old", tmp_path / "spool"
    spooled_readings(old, 20)  # made first: older records
    spooled_readings(live, 20)
    env = {**local_env(broker, live), "PATH": "/usr/bin:/bin"}

    big = tmp_path / "big"
    spooled_readings(big, 3000)  # about 1.2 MB of records
    refused = command({**env, "SPOOL_MAX_BYTES": str(1024**2)}, "spool-import", str(big / "spool.db"))
    assert refused.returncode == 1 and "SPOOL_MAX_BYTES" in refused.stderr
    assert json.loads(command(env, "status").stdout)["records"] == 20  # nothing of it was taken

    assert command(env, "spool-import", str(old / "spool.db")).returncode == 0
    with sqlite3.connect(live / "spool.db") as conn:
        order = [row[0] for row in conn.execute("SELECT created_at FROM records ORDER BY id")]
    assert order[:20] == sorted(order[:20]) and max(order[:20]) < min(order[20:])  # the older spool's first


def test_a_spool_that_cannot_be_read_stops_start_up_with_exit_1_and_is_left_as_it_is(
    broker: Broker, bridges: Callable[..., Bridge], tmp_path: Path
) -> None:
    """No file SQLite can open where the spool should be (here a folder by its name: root reads any file)."""
    spool = tmp_path / "spool"
    (spool / "spool.db").mkdir(parents=True)
    bridge = bridges(local_env(broker, spool)).start()
    assert bridge.process is not None
    assert bridge.process.wait(30) == 1
    errors = [e for e in bridge.log_entries() if e.get("severity") == "ERROR"]
    assert [e["message"] for e in errors] == ["cannot open the spool; nothing was changed, exiting to be restarted"]
    assert (spool / "spool.db").is_dir() and not list(spool.glob("*.corrupt-*"))  # nothing moved aside
