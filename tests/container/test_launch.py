"""The container's process tree without Docker: `python -m fmi_bridge.container.launch` runs the shipped
supervisord.conf with the shipped mosquitto.conf (paths pointed at a temporary folder)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from fmi_bridge.spool import LOCK_FILE
from tests.support import (
    ROOT,
    free_port,
    http_get,
    listening_on,
    mosquitto_pub,
    mqtt_client,
    port_open,
    reading,
    wait_until,
)

pytestmark = pytest.mark.slow

READING = '{"site_code": "MOR", "sensor_id": "FT-1", "timestamp": "2026-11-20T08:00:00Z", "value": 3.5}'


class Container:
    def __init__(self, workdir: Path, **env: str) -> None:
        self.mqtt_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log = workdir / "supervisord.out"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "PUBSUB_", "BIGQUERY_"))}
        self.env = {
            **clean,
            "APP_ENV": "LOCAL",
            "BRIDGE_RUN_DIR": str(workdir / "run"),
            "MOSQUITTO_DATA_DIR": str(workdir / "mosquitto"),
            "MOSQUITTO_PORT": str(self.mqtt_port),
            "PORT": str(self.http_port),
            "METRICS_PORT": str(self.metrics_port),
            "SPOOL_DIR": str(workdir / "spool"),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        # A pipe, as in a container: programs that open /dev/stdout then share it instead of overwriting a file.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fmi_bridge.container.launch"],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a terminal's foreground job (see the Ctrl-C test)
        )
        threading.Thread(target=self._copy_output, daemon=True).start()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        with self.log.open("ab") as out:
            for line in self.process.stdout:
                out.write(line)
                out.flush()

    def ctl(self, *args: str) -> str:
        supervisorctl = Path(sys.executable).parent / "supervisorctl"
        env = {
            **self.env,
            "BRIDGE_APP_DIR": str(ROOT),
            "BRIDGE_PYTHON": sys.executable,
            "BRIDGE_RUN_DIR": self.env["BRIDGE_RUN_DIR"],
        }
        result = subprocess.run(
            [str(supervisorctl), "-c", str(ROOT / "supervisord.conf"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout.strip()

    def ready(self) -> bool:
        return http_get(self.http_port, "/readiness_check")[0] == 200

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def container(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Container]:
    # Mosquitto's folder where Debian's `mosquitto` user can reach it, as in a checkout: pytest's own temporary
    # folders are private to root, and the launcher would then keep the broker as root.
    shared = Path(tempfile.mkdtemp(prefix="fmi-broker-"))
    shared.chmod(0o755)
    running = Container(tmp_path, MOSQUITTO_DATA_DIR=str(shared / "mosquitto"), **getattr(request, "param", {}))
    yield running
    if running.process.poll() is None:
        running.process.terminate()
        try:
            running.process.wait(40)
        except subprocess.TimeoutExpired:
            running.process.kill()
    shutil.rmtree(shared, ignore_errors=True)


def test_both_programs_run_and_a_reading_flows_through(container: Container) -> None:
    wait_until(container.ready, 60, "readiness 200 from the subscriber under supervisord")
    status = wait_until(lambda: (text := container.ctl("status")).count("RUNNING") == 3 and text, 20, "RUNNING")
    assert "mosquitto" in status and "subscriber" in status and "fatal_watch" in status

    assert mosquitto_pub(container.mqtt_port, "FCTS/FAE/MOR/SolvExtract/PI.FT1", READING).returncode == 0

    wait_until(
        lambda: '"message": "reading"' in container.output() and '"pi_tag": "PI.FT1"' in container.output(),
        20,
        "the reading in the subscriber's log on supervisord's stdout",
    )


def test_a_killed_subscriber_is_restarted(container: Container) -> None:
    wait_until(container.ready, 60, "readiness")
    first = int(container.ctl("pid", "subscriber"))

    os.kill(first, signal.SIGKILL)

    wait_until(lambda: container.ctl("pid", "subscriber") not in ("0", str(first), ""), 30, "a new subscriber")
    wait_until(container.ready, 60, "readiness after the restart")
    assert mosquitto_pub(container.mqtt_port, "FCTS/FAE/MOR/SolvExtract/PI.FT2", READING).returncode == 0
    wait_until(lambda: '"pi_tag": "PI.FT2"' in container.output(), 20, "a reading through the new subscriber")


@pytest.mark.parametrize("container", [{"MQTT_PORT": "not-a-port"}], indirect=True)
def test_a_bad_setting_stops_the_start_with_one_line_and_exit_2(container: Container) -> None:
    """Checked before Supervisor starts anything: no broker left listening, no retries to wait through."""
    assert container.process.wait(30) == 2
    assert container.output().strip().splitlines() == [
        "configuration error: MQTT_PORT='not-a-port': must be an integer"
    ]
    assert not port_open(container.mqtt_port)


@pytest.fixture
def spool_held(tmp_path: Path) -> Iterator[None]:
    """The container's spool owned by another process from before the start (its lock taken)."""
    (tmp_path / "spool").mkdir()
    with (tmp_path / "spool" / LOCK_FILE).open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def test_a_subscriber_that_cannot_keep_running_stops_everything_with_exit_1(
    spool_held: None, container: Container
) -> None:
    """A fault found only at run time (here the spool owned by another process): Supervisor gives up, and the
    container ends non-zero, not as a clean stop."""
    assert container.process.wait(90) == 1
    assert "is in use by another process" in container.output()
    output = container.output()
    assert "gave up: subscriber entered FATAL state" in output
    assert "program went FATAL, stopping supervisord" in output
    assert "stopped: a program could not be kept running" in output


ALARMS = re.compile(r'"severity": "(WARNING|ERROR|CRITICAL)"| (CRIT|WARN|ERRO) |: (Warning|Error): ')


def test_a_normal_start_and_stop_raise_no_alarm(container: Container) -> None:
    """What an operator reads after `make run` (as root, as the README's quick start runs) and Ctrl-C: no line of
    severity WARNING or above from the subscriber, Supervisor or Mosquitto."""
    wait_until(container.ready, 60, "readiness")
    assert mosquitto_pub(container.mqtt_port, "FCTS/FAE/MOR/SolvExtract/PI.FT1", READING).returncode == 0
    wait_until(lambda: '"message": "reading"' in container.output(), 20, "the reading logged")

    os.killpg(container.process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group

    assert container.process.wait(40) == 0
    output = container.output()
    assert "stopped: subscriber (exit status 0)" in output
    assert [line for line in output.splitlines() if ALARMS.search(line)] == []


def test_sigterm_stops_everything_cleanly(container: Container) -> None:
    wait_until(container.ready, 60, "readiness")

    container.process.terminate()

    assert container.process.wait(40) == 0
    output = container.output()
    assert '"message": "stopped"' in output
    assert "stopped: subscriber (exit status 0)" in output


def test_broker_log_lines_reach_the_container_log_at_once(container: Container) -> None:
    """Mosquitto buffers stdout on a pipe (lines held back until about 4 KiB); it logs to stderr, unbuffered."""
    wait_until(container.ready, 60, "readiness")
    client_id = f"log-probe-{time.monotonic_ns()}"

    sent = time.monotonic()
    assert (
        mosquitto_pub(container.mqtt_port, "FCTS/FAE/MOR/SolvExtract/PI.FT3", READING, "-i", client_id).returncode == 0
    )

    wait_until(lambda: f"as {client_id}" in container.output(), 10, "the broker's connection line", interval=0.02)
    # Buffered, the line would wait for 4 KiB more of log (indefinitely on a quiet broker); unbuffered it comes
    # at once: 3 s is the margin for a loaded machine.
    assert time.monotonic() - sent < 3.0


def test_local_listens_on_loopback_only(container: Container) -> None:
    """An anonymous broker and the metrics port must not face a developer's network."""
    wait_until(container.ready, 60, "readiness")
    assert listening_on(container.mqtt_port) == {"127.0.0.1"}
    assert listening_on(container.http_port) == {"127.0.0.1"}


def test_on_stop_sites_are_cut_off_before_the_bridge_stops_reading(container: Container) -> None:
    """The broker stops first: every reading acknowledged to a site was acknowledged before the bridge began to
    stop, so none waits in the broker's queue on a disk that a deploy or the weekly restart takes away."""
    wait_until(container.ready, 60, "readiness")
    acknowledged: list[float] = []
    site = mqtt_client()
    site.on_publish = lambda client, userdata, mid, reason, properties: acknowledged.append(time.time())
    site.connect("127.0.0.1", container.mqtt_port)
    site.loop_start()
    stop = threading.Event()

    def publish_until_stopped() -> None:
        for seq in itertools.count():
            if stop.is_set():
                return
            message = reading("MOR", seq)
            site.publish(message.topic, message.payload, qos=1)
            time.sleep(0.005)

    publisher = threading.Thread(target=publish_until_stopped, daemon=True)
    publisher.start()
    wait_until(lambda: len(acknowledged) > 50, 20, "readings flowing")

    container.process.terminate()
    assert container.process.wait(40) == 0
    stop.set()
    publisher.join(5)
    site.loop_stop()

    entries = [json.loads(line) for line in container.output().splitlines() if line.startswith("{")]
    (stopping,) = [e for e in entries if e.get("message", "").startswith("stopping")]
    began_to_stop = datetime.fromisoformat(stopping["time"]).timestamp()
    assert acknowledged and max(acknowledged) < began_to_stop


def processes_of(run_dir: Path) -> list[str]:
    """pid and command of every process started for this run (they carry its BRIDGE_RUN_DIR)."""
    found = []
    marker = f"BRIDGE_RUN_DIR={run_dir}".encode()
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{pid} {command}")
        except OSError:
            continue
    return found


@pytest.mark.parametrize("end", ["ctrl-c", "reader-killed", "terminal-closed"])
def test_nothing_outlives_make_run_piped_into_tee(end: str, tmp_path: Path) -> None:
    """`make run 2>&1 | tee run.log` (here the launcher piped into tee, in a group of its own as a terminal's job),
    then Ctrl-C to the group, only the reader killed, or the terminal closed (SIGHUP): everything stops."""
    shared = Path(tempfile.mkdtemp(prefix="fmi-broker-"))
    shared.chmod(0o755)
    ports = {"MOSQUITTO_PORT": free_port(), "PORT": free_port(), "METRICS_PORT": free_port()}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "PUBSUB_", "BIGQUERY_"))},
        "APP_ENV": "LOCAL",
        "BRIDGE_RUN_DIR": str(tmp_path / "run"),
        "MOSQUITTO_DATA_DIR": str(shared / "mosquitto"),
        "SPOOL_DIR": str(tmp_path / "spool"),
        **{name: str(port) for name, port in ports.items()},
    }
    job = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} -m fmi_bridge.container.launch 2>&1 | tee {tmp_path / 'run.log'}"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: http_get(ports["PORT"], "/readiness_check")[0] == 200, 60, "readiness")
        assert len(processes_of(tmp_path / "run")) >= 3  # launcher, supervisord, subscriber (Mosquitto: its user)
        if end == "ctrl-c":
            os.killpg(job.pid, signal.SIGINT)
        elif end == "terminal-closed":
            os.killpg(job.pid, signal.SIGHUP)
        else:
            tee = subprocess.run(
                ["pgrep", "-g", str(job.pid), "-x", "tee"], capture_output=True, text=True, check=False
            )
            os.kill(int(tee.stdout.split()[0]), signal.SIGKILL)
            mosquitto_pub(ports["MOSQUITTO_PORT"], "FCTS/FAE/MOR/SolvExtract/PI.FT1", READING)  # a line to write

        wait_until(lambda: not processes_of(tmp_path / "run"), 40, "every process gone")
        assert not any(port_open(port) for port in ports.values())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        for leftover in processes_of(tmp_path / "run"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(leftover.split()[0]), signal.SIGKILL)
        shutil.rmtree(shared, ignore_errors=True)
