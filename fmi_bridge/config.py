"""Configuration from the environment: every variable declared once, as data, with its default and help.

The README's variable table is checked against SETTINGS by a test, so this list is the single source.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmi_bridge.partition_window import PartitionWindow

ENVIRONMENTS = ("LOCAL", "DEV", "PPRD", "PRD")
CLOUD_ENVIRONMENTS = ("DEV", "PPRD", "PRD")
# `#`, not `+`, after SolvExtract: a topic one level too deep still arrives and becomes a `bad_topic` reject, so a
# mis-configured site is seen. Other applications' FCTS/FAE/... traffic stays outside the filter.
DEFAULT_TOPIC = "FCTS/FAE/+/SolvExtract/#"


class ConfigError(ValueError):
    """A variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: str | None = None
    parse: Callable[[str], Any] = str
    secret: bool = False


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be an integer") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


MIN_SPOOL_BYTES = 1024**2


def _spool_bytes(text: str) -> int:
    # One record can take about 330 KB (a 64 KiB non-UTF-8 payload, escaped): a smaller spool could never take it.
    value = _int(text)
    if value < MIN_SPOOL_BYTES:
        raise ValueError(f"must be at least {MIN_SPOOL_BYTES} bytes")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 < value < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return value


MAX_SHUTDOWN_SECONDS = 25


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _environment(text: str) -> str:
    if text not in ENVIRONMENTS:
        raise ValueError(f"must be one of {', '.join(ENVIRONMENTS)}")
    return text


def _between(parse: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def bounded(text: str) -> Any:
        value = parse(text)
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}")
        return value

    return bounded


MAX_TOPIC_BYTES = 65535  # an MQTT UTF-8 string


def _topic_filter(text: str) -> str:
    """MQTT's rules for one filter: `#` only as the whole last level, `+` only as a whole level, and a shared
    subscription `$share/<group>/<filter>` with a group name free of `/`, `+` and `#`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES or "\0" in text:
        raise ValueError(f"filter {text[:64]!r} is too long or holds a NUL character")
    filter_text = text
    if text.startswith("$share/"):
        _, group, filter_text = [*text.split("/", 2), "", ""][:3]
        if not group or "+" in group or "#" in group or not filter_text:
            raise ValueError(f"filter {text!r}: a shared subscription is $share/<group>/<filter>")
    levels = filter_text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"filter {text!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"filter {text!r}: '+' must be a whole level")
    return text


def _topic_filters(text: str) -> tuple[str, ...]:
    filters = tuple(part.strip() for part in text.split(","))
    if not all(filters):
        raise ValueError("must be a comma-separated list of non-empty topic filters")
    return tuple(_topic_filter(part) for part in filters)


def split_host_port(text: str) -> tuple[str, int]:
    """(host, port) of `host:port` (an IPv6 host in brackets); ValueError if it is not that."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("must be host:port")
    return host.strip("[]"), int(port)


def _host_port(text: str) -> str:
    split_host_port(text)
    return text


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be a URL starting with http:// or https://")
    return text.rstrip("/")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"file {text} does not exist")
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise ValueError(f"file {text} cannot be read: {exc.strerror}") from None
    return path


def _text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"file {path} cannot be read as UTF-8 text: {exc}") from None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "APP_ENV",
        "Environment: LOCAL logs events only; DEV, PPRD and PRD write to Pub/Sub and BigQuery.",
        None,
        _environment,
    ),
    Setting("GCP_PROJECT_ID", "Google Cloud project of the topic and dataset (required outside LOCAL)."),
    Setting("PUBSUB_TOPIC", "Pub/Sub topic id for KPI events (required outside LOCAL)."),
    Setting(
        "PUBSUB_SCHEMA",
        "Pub/Sub schema id of the KPI event (Avro, schemas/kpi_event.avsc), which `provision` creates and puts on "
        "a new topic, and `check-config` compares with the topic's.",
        "fmi-kpi-event",
    ),
    Setting("BIGQUERY_DATASET", "BigQuery dataset id (required outside LOCAL)."),
    Setting("BIGQUERY_TABLE", "BigQuery table id for valid readings (required outside LOCAL)."),
    Setting(
        "BIGQUERY_LOCATION",
        "Where `provision` creates the dataset (e.g. `EU`, `europe-west1`, `US`) and where query jobs run; a "
        "dataset's location cannot be changed later, so provision names a mismatch.",
        "US",
    ),
    Setting(
        "BIGQUERY_PARTITION_DAYS_PAST",
        "How many days before its arrival a reading's timestamp may lie; older is a `timestamp_out_of_window` "
        "reject, as BigQuery refuses to stream into partitions older than its window (1825 days when last "
        "documented; raise it only if Google widened your project's window).",
        "1825",
        _between(_int, 0, 3_652_058),
    ),
    Setting(
        "BIGQUERY_PARTITION_DAYS_FUTURE",
        "How many days after its arrival a reading's timestamp may lie (BigQuery's window: 366 days).",
        "366",
        _between(_int, 0, 3_652_058),
    ),
    Setting("BIGQUERY_REJECTS_TABLE", "BigQuery table id for rejected messages; default `<BIGQUERY_TABLE>_rejected`."),
    Setting("MQTT_BROKER", "MQTT broker host name.", "localhost"),
    Setting("MQTT_PORT", "MQTT broker port (8883 is usual with TLS).", "1883", _port),
    Setting(
        "MQTT_TOPIC",
        "Topic filter, or comma-separated filters; `$share/<group>/...` shares the load between instances.",
        DEFAULT_TOPIC,
        _topic_filters,
    ),
    Setting(
        "MQTT_CLIENT_ID",
        "Client id of the persistent session; stable across restarts, unique per instance; "
        "default `fmi-mqtt-bridge-<app_env>`. The bundled PPRD/PRD broker uses the user name as the client id "
        "instead, so there each instance needs its own MQTT_USERNAME.",
    ),
    Setting("MQTT_KEEPALIVE", "MQTT keep-alive, seconds (1 to 65535).", "30", _between(_int, 1, 65535)),
    Setting(
        "MQTT_SESSION_EXPIRY",
        "Seconds the broker keeps the session (and queues readings) while the bridge is away (0 to 4294967295).",
        "604800",
        _between(_int, 0, 2**32 - 1),
    ),
    Setting(
        "MQTT_RECEIVE_MAXIMUM",
        "Un-acknowledged QoS 1 messages the broker may have in flight to the bridge (1 to 65535).",
        "1000",
        _between(_int, 1, 65535),
    ),
    Setting("MQTT_USERNAME", "MQTT user name (required in PRD)."),
    Setting("MQTT_PASSWORD", "MQTT password (required in PRD unless MQTT_PASSWORD_FILE is set).", secret=True),
    Setting("MQTT_PASSWORD_FILE", "File holding the MQTT password, e.g. a mounted secret.", parse=_readable_file),
    Setting("MQTT_TLS_CA", "CA certificate file; setting it turns TLS on (required in PRD).", parse=_readable_file),
    Setting("MQTT_TLS_CERT", "Client certificate file for mutual TLS (optional).", parse=_readable_file),
    Setting("MQTT_TLS_KEY", "Client key file for mutual TLS (goes with MQTT_TLS_CERT).", parse=_readable_file),
    Setting("PORT", "HTTP port for /liveness_check and /readiness_check (App Engine's probes).", "8080", _port),
    Setting(
        "METRICS_PORT",
        "HTTP port for /metrics (and the two checks), on 127.0.0.1 only: never reachable from outside the instance.",
        "9464",
        _port,
    ),
    Setting(
        "LISTEN_ADDRESS",
        "Address the health port and the broker's listener bind to; default `127.0.0.1` in LOCAL (a developer's "
        "machine), `0.0.0.0` in DEV, PPRD and PRD (App Engine's probes and the sites must reach them).",
    ),
    Setting("SPOOL_DIR", "Folder of the durable spool (SQLite); must survive restarts.", "spool", Path),
    Setting(
        "SPOOL_MAX_BYTES",
        "Most record bytes the spool holds; when full, new MQTT messages are left un-acknowledged with the broker.",
        str(3 * 1024**3),
        _spool_bytes,
    ),
    Setting(
        "SPOOL_MIN_FREE_BYTES",
        "Free disk space below which the spool takes no more records.",
        str(256 * 1024**2),
        _positive_int,
    ),
    Setting(
        "SPOOL_DEDUPE_COUNT",
        "Readings (and rejects) whose ids the spool remembers, so one the broker or a publisher delivers again is "
        "acknowledged and not spooled twice: at least MQTT_RECEIVE_MAXIMUM (what one connection can leave "
        "un-acknowledged); the default covers 100 lost connections in a row at the default.",
        "100000",
        _between(_int, 1, 100_000_000),
    ),
    Setting(
        "SPOOL_DEDUPE_SECONDS",
        "Seconds an id is remembered however many came after it, for a publisher that resends after it reconnects.",
        "900",
        _between(_int, 0, 30 * 86400),
    ),
    Setting(
        "PUBSUB_EMULATOR_HOST",
        "host:port of a Pub/Sub emulator; anonymous credentials. In LOCAL it turns the Pub/Sub sink on.",
        parse=_host_port,
    ),
    Setting(
        "BIGQUERY_EMULATOR_HOST",
        "URL of a BigQuery emulator, e.g. `http://127.0.0.1:9050`; anonymous credentials. "
        "In LOCAL it turns the BigQuery sink on.",
        parse=_url,
    ),
    Setting(
        "PUBSUB_ENDPOINT",
        "Regional Pub/Sub endpoint, e.g. `us-central1-pubsub.googleapis.com:443`: ordering holds only for "
        "publishes that reach one region. PUBSUB_EMULATOR_HOST wins over it.",
        parse=_host_port,
    ),
    Setting(
        "PUBSUB_BATCH_SIZE",
        "Messages in one Publish request (1 to 1000, Pub/Sub's limit).",
        "1000",
        _between(_int, 1, 1000),
    ),
    Setting(
        "PUBSUB_LANES",
        "Lanes the sites are hashed onto, each with its own sender thread; a site always in the same lane.",
        "4",
        _between(_int, 1, 64),
    ),
    Setting(
        "PUBSUB_SITES_IN_FLIGHT",
        "Publish requests a lane has in flight at once, each of one site (one ordering key); a site has at "
        "most one, so its order holds (1 to 64).",
        "8",
        _between(_int, 1, 64),
    ),
    Setting(
        "PUBSUB_KEY_BYTES_PER_SECOND",
        "Message bytes one site (ordering key) may publish per second; Google allows at most 1,000,000 "
        "(1,000 to 1000000).",
        "1000000",
        _between(_int, 1000, 1_000_000),
    ),
    Setting(
        "PUBSUB_DEADLETTER_ATTEMPTS",
        "Times one reading alone may be refused by Pub/Sub as invalid before it goes to the rejects table.",
        "3",
        _positive_int,
    ),
    Setting(
        "BIGQUERY_WRITE_METHOD",
        "`storage_write`: the Storage Write API, committed streams with offsets, exactly once; `insert_all`: "
        "streaming inserts, at least once (insertId dedup is best effort). With BIGQUERY_EMULATOR_HOST but no "
        "BIGQUERY_STORAGE_EMULATOR_HOST, `insert_all`.",
        "storage_write",
        _choice("storage_write", "insert_all"),
    ),
    Setting(
        "BIGQUERY_STORAGE_EMULATOR_HOST",
        "host:port of the BigQuery emulator's gRPC port, for the Storage Write API beside BIGQUERY_EMULATOR_HOST.",
        parse=_host_port,
    ),
    Setting("BIGQUERY_BATCH_SIZE", "Rows one insertAll request takes (`insert_all`).", "500", _positive_int),
    Setting(
        "BIGQUERY_APPEND_ROWS",
        "Rows one Storage Write API append takes (`storage_write`; 1 to 10000, and always under 10 MB). Fewer, "
        "larger appends cost BigQuery and the bridge less a row.",
        "2000",
        _between(_int, 1, 10000),
    ),
    Setting(
        "BIGQUERY_APPENDS_IN_FLIGHT",
        "Storage Write API appends a lane sends on its connection before it awaits the first answer, so a round "
        "trip is not paid per append (1 to 16).",
        "4",
        _between(_int, 1, 16),
    ),
    Setting(
        "BIGQUERY_STREAM_MAX_IDLE_SECONDS",
        "A Storage Write API stream no append has landed on for this long is replaced before the lane's next "
        "append, when none is unsettled; Google expires a committed stream after four days without traffic "
        "(1 to 345000).",
        "259200",
        _between(_positive_float, 1, 345_000),
    ),
    Setting(
        "SETUP_TIMEOUT_SECONDS",
        "How long check-config and provision wait for each endpoint before naming it as not answering.",
        "5",
        _between(_positive_float, 0.1, 120),
    ),
    Setting(
        "SINK_TIMEOUT_SECONDS",
        "How long one send to Pub/Sub or BigQuery may take before it is retried later.",
        "30",
        _positive_float,
    ),
    Setting(
        "LIVENESS_STALL_SECONDS",
        "A loop (intake, MQTT link, a sender) that has not come round for this long fails /liveness_check; "
        "default max(120, 3 * SINK_TIMEOUT_SECONDS + 30), since one send may take SINK_TIMEOUT_SECONDS "
        "(at least 10: the stats loop comes round every 5 s).",
        parse=_between(_positive_float, 10, 86400),
    ),
    Setting(
        "SHUTDOWN_FLUSH_SECONDS",
        "On SIGTERM, the whole stop sequence's deadline (at most 25: Supervisor waits 28 s, App Engine 30 s); "
        "what the sinks could not take by then stays spooled.",
        "20",
        _between(_positive_float, 1, MAX_SHUTDOWN_SECONDS),
    ),
    Setting(
        "SINK_LAG_WARN_SECONDS",
        "A WARNING line when the oldest record a sink still owes is older than this.",
        "300",
        _positive_float,
    ),
    Setting(
        "STATS_LOG_SECONDS",
        "Every so many seconds one JSON log line `stats`: counts, what each sink owes, spool bytes, time to full.",
        "60",
        _positive_float,
    ),
    Setting("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", "INFO", _log_level),
)


@dataclass(frozen=True)
class Config:
    app_env: str
    gcp_project_id: str | None
    pubsub_topic: str | None
    pubsub_schema: str
    bigquery_dataset: str | None
    bigquery_table: str | None
    bigquery_rejects_table: str | None
    bigquery_location: str
    bigquery_partition_days_past: int
    bigquery_partition_days_future: int
    mqtt_broker: str
    mqtt_port: int
    mqtt_topic: tuple[str, ...]
    mqtt_client_id: str
    mqtt_keepalive: int
    mqtt_session_expiry: int
    mqtt_receive_maximum: int
    mqtt_username: str | None
    mqtt_password: str | None = field(repr=False)
    mqtt_password_file: Path | None
    mqtt_tls_ca: Path | None
    mqtt_tls_cert: Path | None
    mqtt_tls_key: Path | None
    port: int
    listen_address: str
    metrics_port: int
    spool_dir: Path
    spool_max_bytes: int
    spool_min_free_bytes: int
    spool_dedupe_count: int
    spool_dedupe_seconds: int
    pubsub_emulator_host: str | None
    bigquery_emulator_host: str | None
    pubsub_endpoint: str | None
    pubsub_batch_size: int
    pubsub_lanes: int
    pubsub_sites_in_flight: int
    pubsub_key_bytes_per_second: int
    pubsub_deadletter_attempts: int
    bigquery_write_method: str
    bigquery_storage_emulator_host: str | None
    bigquery_batch_size: int
    bigquery_append_rows: int
    bigquery_stream_max_idle_seconds: float
    bigquery_appends_in_flight: int
    setup_timeout_seconds: float
    sink_timeout_seconds: float
    liveness_stall_seconds: float
    shutdown_flush_seconds: float
    sink_lag_warn_seconds: float
    stats_log_seconds: float
    log_level: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            given = environ.get(setting.name)
            if given is not None and not given.strip() and setting.default is not None:
                # Set but empty is a mistake (a template not filled in), not a request for the default.
                raise ConfigError(f"{setting.name} is set but empty; unset it for the default {setting.default!r}")
            raw = (given or "").strip() or setting.default
            if raw is None:
                values[setting.name.lower()] = None
                continue
            try:
                values[setting.name.lower()] = setting.parse(raw)
            except ValueError as exc:
                shown = "***" if setting.secret else repr(raw)
                raise ConfigError(f"{setting.name}={shown}: {exc}") from exc
        if values["app_env"] is None:
            raise ConfigError(f"APP_ENV is required: one of {', '.join(ENVIRONMENTS)}")
        if values["listen_address"] is None:
            values["listen_address"] = listen_address(values["app_env"])
        if values["liveness_stall_seconds"] is None:
            values["liveness_stall_seconds"] = max(120.0, 3 * values["sink_timeout_seconds"] + 30)
        if values["mqtt_client_id"] is None:
            values["mqtt_client_id"] = f"fmi-mqtt-bridge-{values['app_env'].lower()}"
        if values["bigquery_rejects_table"] is None and values["bigquery_table"]:
            values["bigquery_rejects_table"] = f"{values['bigquery_table']}_rejected"
        if values["bigquery_emulator_host"] and not values["bigquery_storage_emulator_host"]:
            values["bigquery_write_method"] = "insert_all"  # an emulator's REST port alone has no Write API
        if values["mqtt_password_file"] is not None:
            try:
                values["mqtt_password"] = _text_file(values["mqtt_password_file"])
            except ValueError as exc:
                raise ConfigError(f"MQTT_PASSWORD_FILE: {exc}") from None
        config = cls(**values)
        config._check_consistency()
        return config

    @property
    def pubsub_enabled(self) -> bool:
        return self.app_env in CLOUD_ENVIRONMENTS or self.pubsub_emulator_host is not None

    @property
    def bigquery_enabled(self) -> bool:
        return self.app_env in CLOUD_ENVIRONMENTS or self.bigquery_emulator_host is not None

    @property
    def partition_window(self) -> PartitionWindow:
        return PartitionWindow(self.bigquery_partition_days_past, self.bigquery_partition_days_future)

    @property
    def tls_enabled(self) -> bool:
        return self.mqtt_tls_ca is not None

    def _why_enabled(self, emulator_variable: str, sink: str) -> str:
        if self.app_env in CLOUD_ENVIRONMENTS:
            return f"when APP_ENV={self.app_env} (it writes to Pub/Sub and BigQuery)"
        return f"when {emulator_variable} is set (APP_ENV=LOCAL then writes to that {sink} emulator)"

    def _check_consistency(self) -> None:
        needed = []
        if self.pubsub_enabled:
            because = self._why_enabled("PUBSUB_EMULATOR_HOST", "Pub/Sub")
            needed += [("GCP_PROJECT_ID", self.gcp_project_id, because), ("PUBSUB_TOPIC", self.pubsub_topic, because)]
        if self.bigquery_enabled:
            because = self._why_enabled("BIGQUERY_EMULATOR_HOST", "BigQuery")
            needed += [
                ("GCP_PROJECT_ID", self.gcp_project_id, because),
                ("BIGQUERY_DATASET", self.bigquery_dataset, because),
                ("BIGQUERY_TABLE", self.bigquery_table, because),
            ]
        for name, value, because in needed:
            if not value:
                raise ConfigError(f"{name} is required {because}")
        if (self.mqtt_tls_cert is None) != (self.mqtt_tls_key is None):
            raise ConfigError("MQTT_TLS_CERT and MQTT_TLS_KEY must be set together")
        if self.spool_dedupe_count < self.mqtt_receive_maximum:
            raise ConfigError(
                f"SPOOL_DEDUPE_COUNT={self.spool_dedupe_count}: must be at least MQTT_RECEIVE_MAXIMUM "
                f"({self.mqtt_receive_maximum}), or a reading left un-acknowledged at a restart is spooled twice"
            )
        if self.port == self.metrics_port:
            raise ConfigError(f"PORT and METRICS_PORT are both {self.port}: each needs a port of its own")
        self._check_tls_files()
        if self.mqtt_password and not self.mqtt_username:
            raise ConfigError("MQTT_USERNAME is required when a password is set")
        if self.app_env == "PRD":
            if not self.tls_enabled:
                raise ConfigError("MQTT_TLS_CA is required in PRD: the broker connection must use TLS")
            if not (self.mqtt_username and self.mqtt_password):
                raise ConfigError("MQTT_USERNAME and MQTT_PASSWORD (or MQTT_PASSWORD_FILE) are required in PRD")

    def _check_tls_files(self) -> None:
        """Load them as the MQTT link will, so a wrong file stops start-up here, not in a restart loop."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.mqtt_tls_ca is not None:
            try:
                context.load_verify_locations(cafile=str(self.mqtt_tls_ca))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"MQTT_TLS_CA={self.mqtt_tls_ca}: not a PEM CA certificate ({exc})") from None
        if self.mqtt_tls_cert is not None and self.mqtt_tls_key is not None:
            try:
                context.load_cert_chain(str(self.mqtt_tls_cert), str(self.mqtt_tls_key))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(
                    f"MQTT_TLS_CERT={self.mqtt_tls_cert}, MQTT_TLS_KEY={self.mqtt_tls_key}: "
                    f"not a matching PEM certificate and key ({exc})"
                ) from None

    def describe(self) -> dict[str, Any]:
        """The effective configuration, secrets masked, for check-config and the start-up log."""
        shown: dict[str, Any] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name.lower())
            if setting.secret and value:
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = ",".join(value)
            shown[setting.name] = value
        shown["sinks"] = [
            name for name, on in (("pubsub", self.pubsub_enabled), ("bigquery", self.bigquery_enabled)) if on
        ] or ["log"]
        return shown


def listen_address(app_env: str) -> str:
    return "127.0.0.1" if app_env == "LOCAL" else "0.0.0.0"


def markdown_table(settings: tuple[Setting, ...]) -> str:
    """The README's variable table, made from the declarations (a test keeps the README in step)."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for setting in settings:
        default = f"`{setting.default}`" if setting.default is not None else ""
        lines.append(f"| `{setting.name}` | {default} | {setting.help} |")
    return "\n".join(lines)
