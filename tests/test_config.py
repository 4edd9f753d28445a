"""Configuration: bad values stop start-up with exit 2 and one line naming the variable; secrets never show."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmi_bridge.commands.cli import COMMANDS
from fmi_bridge.config import SETTINGS, Config, ConfigError, markdown_table
from fmi_bridge.container.launch import LAUNCH_SETTINGS
from tests.container.test_security import make_pki
from tools.readme_tables import render

ROOT = Path(__file__).resolve().parent.parent
CLOUD = {"GCP_PROJECT_ID": "p", "PUBSUB_TOPIC": "t", "BIGQUERY_DATASET": "d", "BIGQUERY_TABLE": "readings"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in {s.name for s in SETTINGS} and not key.startswith("MQTT_")
    }
    # Never let credential discovery probe the GCE metadata server (not on this machine's loopback).
    clean["NO_GCE_CHECK"] = "True"
    return subprocess.run(
        [sys.executable, str(ROOT / "mqtt_subscriber.py"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({}, "APP_ENV", "required"),
        ({"APP_ENV": "TEST"}, "APP_ENV", "must be one of LOCAL, DEV, PPRD, PRD"),
        ({"APP_ENV": "DEV"}, "GCP_PROJECT_ID", "required"),
        ({"APP_ENV": "DEV", **CLOUD, "BIGQUERY_TABLE": ""}, "BIGQUERY_TABLE", "required"),
        ({"APP_ENV": "LOCAL", "MQTT_PORT": "eighty"}, "MQTT_PORT", "must be an integer"),
        ({"APP_ENV": "LOCAL", "MQTT_PORT": "70000"}, "MQTT_PORT", "port number"),
        ({"APP_ENV": "LOCAL", "SPOOL_MAX_BYTES": "-1"}, "SPOOL_MAX_BYTES", "at least 1048576"),
        ({"APP_ENV": "LOCAL", "SPOOL_MIN_FREE_BYTES": "0"}, "SPOOL_MIN_FREE_BYTES", "positive"),
        ({"APP_ENV": "LOCAL", "MQTT_TOPIC": "a,,b"}, "MQTT_TOPIC", "non-empty"),
        ({"APP_ENV": "LOCAL", "MQTT_PORT": ""}, "MQTT_PORT", "set but empty"),
        ({"APP_ENV": "LOCAL", "SPOOL_DIR": "  "}, "SPOOL_DIR", "set but empty"),
        (
            {"APP_ENV": "LOCAL", "MQTT_TOPIC": "FCTS/#/SolvExtract"},
            "MQTT_TOPIC",
            "'#' must be a whole level and the last",
        ),
        ({"APP_ENV": "LOCAL", "MQTT_TOPIC": "FCTS/FAE/M+/x"}, "MQTT_TOPIC", "'+' must be a whole level"),
        ({"APP_ENV": "LOCAL", "MQTT_TOPIC": "$share/g"}, "MQTT_TOPIC", "$share/<group>/<filter>"),
        ({"APP_ENV": "LOCAL", "MQTT_TOPIC": "$share/g#/a/b"}, "MQTT_TOPIC", "$share/<group>/<filter>"),
        ({"APP_ENV": "LOCAL", "MQTT_RECEIVE_MAXIMUM": "65536"}, "MQTT_RECEIVE_MAXIMUM", "from 1 to 65535"),
        ({"APP_ENV": "LOCAL", "MQTT_RECEIVE_MAXIMUM": "0"}, "MQTT_RECEIVE_MAXIMUM", "from 1 to 65535"),
        ({"APP_ENV": "LOCAL", "MQTT_SESSION_EXPIRY": str(2**32)}, "MQTT_SESSION_EXPIRY", "from 0 to 4294967295"),
        ({"APP_ENV": "LOCAL", "MQTT_KEEPALIVE": "70000"}, "MQTT_KEEPALIVE", "from 1 to 65535"),
        ({"APP_ENV": "LOCAL", "PUBSUB_EMULATOR_HOST": "localhost"}, "PUBSUB_EMULATOR_HOST", "host:port"),
        ({"APP_ENV": "LOCAL", "BIGQUERY_EMULATOR_HOST": "127.0.0.1:9050"}, "BIGQUERY_EMULATOR_HOST", "http://"),
        ({"APP_ENV": "LOCAL", "PUBSUB_EMULATOR_HOST": "127.0.0.1:1"}, "GCP_PROJECT_ID", "PUBSUB_EMULATOR_HOST is set"),
        ({"APP_ENV": "LOCAL", "MQTT_TLS_CA": "/nonexistent/ca.pem"}, "MQTT_TLS_CA", "does not exist"),
        ({"APP_ENV": "PRD", **CLOUD}, "MQTT_TLS_CA", "TLS"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(env: dict[str, str], variable: str, problem: str) -> None:
    result = run(env, "check-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and problem in lines[0]
    assert result.stdout == ""


def test_bad_configuration_stops_the_daemon_too() -> None:
    result = run({"APP_ENV": "DEV"})
    assert result.returncode == 2
    assert "GCP_PROJECT_ID" in result.stderr


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real self-signed CA certificate, its key beside it (ca.key)."""
    return make_pki(tmp_path_factory.mktemp("pki")).ca


def test_session_expiry_0_is_allowed() -> None:
    assert Config.from_env({"APP_ENV": "LOCAL", "MQTT_SESSION_EXPIRY": "0"}).mqtt_session_expiry == 0


@pytest.mark.parametrize(
    ("variable", "content", "problem"),
    [
        ("MQTT_PASSWORD_FILE", b"\xff\xfe not text", "cannot be read as UTF-8 text"),
        ("MQTT_TLS_CA", b"-----BEGIN CERTIFICATE-----\nnot base64\n", "not a PEM CA certificate"),
        ("MQTT_TLS_CA", None, "does not exist"),  # a folder where a file should be
    ],
)
def test_an_unusable_file_stops_start_up_with_one_line(
    tmp_path: Path, variable: str, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "file"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    env = {"APP_ENV": "LOCAL", "MQTT_USERNAME": "bridge", variable: str(path)}
    for args in (("check-config",), ()):
        result = run(env, *args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0] and problem in lines[0], result.stderr


def test_a_client_certificate_must_match_its_key(tmp_path: Path, ca: Path) -> None:
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True, timeout=60)
    env = {"APP_ENV": "LOCAL", "MQTT_TLS_CA": str(ca), "MQTT_TLS_CERT": str(ca), "MQTT_TLS_KEY": str(other)}
    result = run(env, "check-config")
    assert result.returncode == 2 and "not a matching PEM certificate and key" in result.stderr
    assert run({**env, "MQTT_TLS_KEY": str(ca.with_name("ca.key"))}, "check-config", "--offline").returncode == 0


def test_prd_needs_credentials_besides_tls(ca: Path) -> None:
    result = run({"APP_ENV": "PRD", **CLOUD, "MQTT_TLS_CA": str(ca), "MQTT_USERNAME": "bridge"}, "check-config")
    assert result.returncode == 2
    assert "MQTT_PASSWORD" in result.stderr


def service_account_key(folder: Path, ca: Path) -> Path:
    """A syntactically real key file: Application Default Credentials load from it without any network."""
    key = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "k",
        "private_key": ca.with_name("ca.key").read_text(),
        "client_email": "bridge@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path = folder / "service-account.json"
    path.write_text(json.dumps(key))
    return path


def test_check_config_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path, ca: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\n")
    env = {
        "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_key(tmp_path, ca)),
        "APP_ENV": "PRD",
        **CLOUD,
        "MQTT_TLS_CA": str(ca),
        "MQTT_USERNAME": "bridge",
        "MQTT_PASSWORD_FILE": str(secret),
    }
    result = run(env, "check-config", "--offline")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["MQTT_PASSWORD"] == "***"
    assert "s3cret" not in result.stdout + result.stderr
    assert shown["BIGQUERY_REJECTS_TABLE"] == "readings_rejected"
    assert shown["MQTT_CLIENT_ID"] == "fmi-mqtt-bridge-prd"
    assert shown["MQTT_TOPIC"] == "FCTS/FAE/+/SolvExtract/#"
    assert shown["sinks"] == ["pubsub", "bigquery"]


def test_a_secret_in_a_bad_value_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"APP_ENV": "LOCAL", "MQTT_PASSWORD": "hunter2"})
    assert "hunter2" not in str(raised.value)


def test_local_sinks_follow_the_emulator_hosts() -> None:
    local = Config.from_env({"APP_ENV": "LOCAL"})
    assert not local.pubsub_enabled and not local.bigquery_enabled
    with_pubsub = Config.from_env({"APP_ENV": "LOCAL", **CLOUD, "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085"})
    assert with_pubsub.pubsub_enabled and not with_pubsub.bigquery_enabled
    assert Config.from_env({"APP_ENV": "DEV", **CLOUD}).bigquery_enabled


def test_readme_lists_every_variable_as_declared() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table(SETTINGS) in readme
    assert markdown_table(LAUNCH_SETTINGS) in readme
    assert render(readme) == readme, "run tools/readme_tables.py"


@pytest.mark.parametrize("command", [(), ("check-config",), ("provision",)])
def test_a_cloud_environment_without_google_credentials_stops_with_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = {
        "APP_ENV": "DEV",
        **CLOUD,
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json"),
        "PUBSUB_EMULATOR_HOST": "",
        "BIGQUERY_EMULATOR_HOST": "",
    }
    result = run(env, *command)
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: no Google credentials for APP_ENV=DEV")
    assert (
        "GOOGLE_APPLICATION_CREDENTIALS" in result.stderr and "gcloud auth application-default login" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    # Emulators need no credentials: the same environment with them set passes the check.
    emulated = {**env, "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085", "BIGQUERY_EMULATOR_HOST": "http://127.0.0.1:9050"}
    assert run(emulated, "check-config", "--offline").returncode == 0


def test_pubsub_endpoint_reaches_the_client_and_the_emulator_wins(
    tmp_path: Path, ca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regional endpoint keeps a site's ordered publishes in one region; tests still go to the emulator."""
    from fmi_bridge.cloud import publisher_client

    monkeypatch.setenv(
        "GOOGLE_APPLICATION_CREDENTIALS", str(service_account_key(tmp_path, ca))
    )  # builds the client; nothing is sent
    regional = {"APP_ENV": "DEV", **CLOUD, "PUBSUB_ENDPOINT": "us-central1-pubsub.googleapis.com:443"}

    assert publisher_client(Config.from_env(regional)).api_endpoint == "us-central1-pubsub.googleapis.com:443"
    assert publisher_client(Config.from_env({"APP_ENV": "DEV", **CLOUD})).api_endpoint == "pubsub.googleapis.com"
    with_emulator = Config.from_env({**regional, "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085"})
    assert publisher_client(with_emulator).api_endpoint != "us-central1-pubsub.googleapis.com:443"
    assert run({**regional, "PUBSUB_ENDPOINT": "us-central1-pubsub.googleapis.com"}, "check-config").returncode == 2


def test_the_write_method_follows_what_the_emulator_offers() -> None:
    cloud = {"APP_ENV": "DEV", **CLOUD}
    assert Config.from_env(cloud).bigquery_write_method == "storage_write"  # the default against BigQuery
    rest_only = {**cloud, "BIGQUERY_EMULATOR_HOST": "http://127.0.0.1:9050"}
    assert Config.from_env(rest_only).bigquery_write_method == "insert_all"
    both = {**rest_only, "BIGQUERY_STORAGE_EMULATOR_HOST": "127.0.0.1:9060"}
    assert Config.from_env(both).bigquery_write_method == "storage_write"
    assert run({**cloud, "BIGQUERY_WRITE_METHOD": "streaming"}, "check-config").returncode == 2


def test_help_lists_the_commands_and_every_variable() -> None:
    result = run({}, "--help")
    assert result.returncode == 0 and result.stderr == ""
    for command in ("check-config", "provision", "status", "spool-import"):
        assert command in result.stdout
    for setting in SETTINGS:
        assert setting.name in result.stdout


def test_help_opens_with_a_title_and_survives_a_closed_pipe() -> None:
    assert run({}, "--help").stdout.splitlines()[0].startswith("fmi-mqtt-bridge: ")
    reader, writer = os.pipe()
    os.close(reader)  # as `--help | head -2` once head has its lines: every write meets a closed pipe
    try:
        result = subprocess.run(
            [sys.executable, "mqtt_subscriber.py", "--help"],
            cwd=ROOT,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert result.returncode == 0
    assert result.stderr == ""  # no BrokenPipeError traceback


def test_an_unknown_command_is_one_line_naming_the_commands() -> None:
    result = run({}, "bogus")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mqtt_subscriber.py: unknown command 'bogus'; the commands are check-config, provision, status, "
        "spool-import, replay, and none runs the bridge (--help lists them)"
    ]
    assert "run" not in result.stderr.split(";")[1].split(",")  # no hidden command offered


def test_help_and_the_readme_name_the_same_commands_and_exit_codes() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    assert table.count("| Command | What it does |") == 1
    in_readme = set(re.findall(r"\| `\.venv/bin/python mqtt_subscriber\.py ([a-z-]+)", table))
    assert in_readme == set(COMMANDS)
    help_text = run({}, "--help").stdout
    assert set(re.findall(r"python mqtt_subscriber\.py ([a-z-]+)", help_text)) == set(COMMANDS)
    assert "exit 0, 1 (an endpoint does not answer) or 2 (a bad setting)" in " ".join(help_text.split())
    check_readme = table.split("mqtt_subscriber.py check-config`", 1)[1].split("\n", 1)[0]
    assert "Exit 0; 2 with one line naming the variable" in check_readme
    assert "1 with one line naming each endpoint that does not answer" in check_readme
