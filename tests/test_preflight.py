"""An environment that cannot serve stops start-up with one line naming the variable, exit 2, and nothing left
running: a port another program holds (named with its pid), for the subscriber alone and for each port the
container's launcher starts a program on; one port named twice; an unusable spool folder; a second bridge on
the same spool."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import ROOT, Broker, free_port, port_open, wait_until

HOLD = (
    "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
    "print(1, flush=True); time.sleep(60)"
)


@contextmanager
def held(port: int) -> Iterator[int]:
    """Another program listening on the port (as a second exporter on 9464 would); its pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(port=port)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def clean_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "PUBSUB_", "BIGQUERY_", "MOSQUITTO_"))}
    return {
        **base,
        "APP_ENV": "LOCAL",
        "PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "BRIDGE_RUN_DIR": str(tmp_path / "run"),
        "MOSQUITTO_DATA_DIR": str(tmp_path / "mosquitto"),
        "MOSQUITTO_PORT": str(free_port()),
        **env,
    }


def start(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def subscriber(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return start(env, sys.executable, "mqtt_subscriber.py")


def launcher(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return start(env, sys.executable, "-m", "fmi_bridge.container.launch")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("variable", ["PORT", "METRICS_PORT"])
def test_the_subscriber_stops_at_a_taken_port_before_the_spool_or_the_broker(
    variable: str, broker: Broker, tmp_path: Path
) -> None:
    port = free_port()
    with held(port) as pid:
        result = subscriber(clean_env(tmp_path, MQTT_PORT=str(broker.port), **{variable: str(port)}))
    line = one_line(result)
    assert f"{variable}={port}" in line and "in use" in line and f"pid {pid}" in line, line
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "spool").exists()  # stopped before the spool was opened (and so before the broker)


@pytest.mark.parametrize("variable", ["MOSQUITTO_PORT", "PORT", "METRICS_PORT"])
def test_the_launcher_checks_every_port_before_anything_starts(variable: str, tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, **{variable: str(port)})
    others = [int(env[name]) for name in ("MOSQUITTO_PORT", "PORT", "METRICS_PORT") if name != variable]
    with held(port) as pid:
        result = launcher(env)
    line = one_line(result)
    assert f"{variable}={port}" in line and f"pid {pid}" in line, line
    assert not (tmp_path / "run" / "supervisor.sock").exists()  # supervisord never started
    assert not any(port_open(other) for other in others)  # nor Mosquitto or the subscriber
    assert not (tmp_path / "spool").exists()


def test_one_port_named_twice_is_refused_before_anything_starts(tmp_path: Path) -> None:
    port = str(free_port())
    assert "PORT and METRICS_PORT are both" in one_line(subscriber(clean_env(tmp_path, PORT=port, METRICS_PORT=port)))
    line = one_line(launcher(clean_env(tmp_path, MOSQUITTO_PORT=port, PORT=port)))
    assert "MOSQUITTO_PORT and PORT are both" in line, line


def test_an_unusable_spool_folder_is_named_as_spool_dir(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    env = clean_env(tmp_path, SPOOL_DIR=str(in_the_way / "spool"))
    for result in (subscriber(env), launcher(env)):
        line = one_line(result)
        assert line.startswith(f"configuration error: SPOOL_DIR={in_the_way / 'spool'}: the folder cannot be used")


def test_mqtt_port_alone_moves_the_bundled_broker_with_the_bridge(tmp_path: Path) -> None:
    port = str(free_port())
    env = clean_env(tmp_path, MQTT_PORT=port)
    del env["MOSQUITTO_PORT"]
    rendered = start(env, sys.executable, "-m", "fmi_bridge.container.launch", "--render")
    assert rendered.returncode == 0, rendered.stderr
    assert f"listener {port} " in Path(rendered.stdout.strip()).read_text()
    both = clean_env(tmp_path, MQTT_PORT=port)  # and MOSQUITTO_PORT another: the bridge would never reach it
    command = [sys.executable, "-m", "fmi_bridge.container.launch"]
    running = subprocess.Popen(
        command, env=both, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert running.stderr is not None
        first = running.stderr.readline()
    finally:
        running.terminate()
        running.wait(40)
    assert first.startswith(f"warning: MQTT_PORT={port} but the bundled broker listens on MOSQUITTO_PORT="), first


def test_a_second_launch_from_the_same_folder_is_named_not_supervisords_socket_error(tmp_path: Path) -> None:
    """`make run` twice in one clone: the second would meet the first's supervisord socket ("Another program is
    already listening on a port"); it is refused first, naming BRIDGE_RUN_DIR."""
    env = clean_env(tmp_path)
    command = [sys.executable, "-m", "fmi_bridge.container.launch"]
    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until((tmp_path / "run" / "supervisor.sock").exists, 30, "the first run's supervisord")
        again = clean_env(tmp_path)  # other ports, the same folders
        line = one_line(launcher(again))
        assert line.startswith(f"configuration error: BRIDGE_RUN_DIR={tmp_path / 'run'}: a bridge started from it")
        assert first.poll() is None  # the first run is untouched
    finally:
        first.terminate()
        first.wait(40)
