"""fmi-mqtt-bridge: MQTT sensor readings → validated KPI events → durable spool → Pub/Sub and BigQuery.

    python mqtt_subscriber.py                 run the bridge until SIGTERM
    python mqtt_subscriber.py check-config    print the effective configuration (secrets masked); exit 0 or 2
    python mqtt_subscriber.py provision       create the Pub/Sub topic, dataset and tables; safe to repeat
    python mqtt_subscriber.py status          what the spool holds per sink, and files moved aside; read only
    python mqtt_subscriber.py spool-import F  take the pending records of spool file F (bridge stopped); safe to repeat

The flow, top to bottom: configuration → spool → senders (one per sink) → intake → MQTT link → health → wait
for SIGTERM → stop intake, flush within the bound, keep the rest spooled.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from google.api_core.exceptions import GoogleAPIError
from google.auth.exceptions import DefaultCredentialsError

from fmi_bridge import cloud, spool_admin
from fmi_bridge.config import Config, ConfigError
from fmi_bridge.health import HealthServer
from fmi_bridge.inbox import Inbox
from fmi_bridge.intake import Intake
from fmi_bridge.logs import setup_logging
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt_link import MqttLink
from fmi_bridge.provision import provision
from fmi_bridge.senders import Sender
from fmi_bridge.sink_bigquery import BigQuerySink
from fmi_bridge.sink_pubsub import PubSubSink
from fmi_bridge.sinks import BIGQUERY, LOG, PUBSUB, LogSink, Sink
from fmi_bridge.spool import Spool, SpoolError

log = logging.getLogger("fmi_bridge")

EXIT_CONFIG = 2
EXIT_FAULT = 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command, operands = (args[0], args[1:]) if args else ("run", [])
    commands: dict[str, Callable[..., int]] = {
        "run": run,
        "check-config": check_config,
        "provision": provision_resources,
        "status": spool_status,
        "spool-import": spool_import,
    }
    if command not in commands or len(operands) != (command == "spool-import"):
        print(f"usage: mqtt_subscriber.py [{' | '.join(commands)}]  (spool-import takes a FILE)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    try:
        return commands[command](config, *operands)
    except DefaultCredentialsError as exc:
        print(f"configuration error: no Google credentials for APP_ENV={config.app_env}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except GoogleAPIError as exc:  # e.g. provision against an unreachable or refusing API
        print(f"{command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAULT


def check_config(config: Config) -> int:
    print(json.dumps(config.describe(), indent=2))
    return 0


def provision_resources(config: Config) -> int:
    provision(config)
    return 0


def spool_status(config: Config) -> int:
    print(json.dumps(spool_admin.status(config.spool_dir), indent=2))
    return 0


def spool_import(config: Config, source: str) -> int:
    try:
        spool = open_spool(config)
        result = spool_admin.import_spool(spool, Path(source))
    except SpoolError as exc:
        print(f"spool-import failed: {exc}", file=sys.stderr)
        return EXIT_FAULT
    print(json.dumps(asdict(result)))
    return 0


def build_sinks(config: Config) -> list[Sink]:
    """One sink per enabled destination; with none (plain LOCAL) the log sink stands in for both."""
    sinks: list[Sink] = []
    if config.pubsub_enabled:
        sinks.append(
            PubSubSink(
                cloud.publisher_client(config),
                cloud.topic_path(config),
                batch_size=config.pubsub_batch_size,
                deadletter_attempts=config.pubsub_deadletter_attempts,
                timeout=config.sink_timeout_seconds,
            )
        )
    if config.bigquery_enabled:
        sinks.append(
            BigQuerySink(
                cloud.bigquery_client(config),
                cloud.table_id(config, config.bigquery_table),
                cloud.table_id(config, config.bigquery_rejects_table),
                batch_size=config.bigquery_batch_size,
                timeout=config.sink_timeout_seconds,
            )
        )
    if not config.bigquery_enabled:
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
    )
    for bit, name in ((PUBSUB, "pubsub"), (BIGQUERY, "bigquery"), (LOG, "log")):
        if bit not in bits and (waiting := spool.count_pending(bit)):
            log.warning(
                "spool holds records for a sink this configuration does not run; they are kept",
                extra={"sink": name, "records": waiting},
            )
    return spool


def run(config: Config) -> int:
    log.info("starting", extra={"config": config.describe()})
    metrics = Metrics()
    sinks = build_sinks(config)
    try:
        spool = open_spool(config)
    except SpoolError as exc:
        log.error("cannot open the spool; nothing was changed, exiting to be restarted", extra={"error": str(exc)})
        return EXIT_FAULT
    metrics.watch_spool(spool.stats)

    senders = [Sender(sink, spool, metrics) for sink in sinks]
    inbox = Inbox()
    metrics.watch_inbox(inbox.__len__)
    link = MqttLink(config, metrics, inbox)

    def wake_senders() -> None:
        for sender in senders:
            sender.wakeup.set()

    intake = Intake(spool, metrics, inbox, ack=link.ack_later, committed=wake_senders)

    stopping = _on_sigterm()
    failed: list[str] = []  # loops that died: the process then stops and exits non-zero, for Supervisor to restart

    def guarded(name: str, loop: Callable[[threading.Event], None], stop: threading.Event) -> threading.Thread:
        def body() -> None:
            try:
                loop(stop)
            except Exception:  # thread boundary: a dead loop must not leave a half-working bridge
                log.exception("loop failed; stopping so the process is restarted", extra={"loop": name})
                failed.append(name)
                stopping.set()

        return threading.Thread(target=body, name=name, daemon=True)

    stop_intake, stop_link, stop_senders = threading.Event(), threading.Event(), threading.Event()
    threads = [guarded("intake", intake.run, stop_intake), guarded("mqtt", link.run, stop_link)]
    threads += [guarded(f"sender-{sender.sink.name}", sender.run, stop_senders) for sender in senders]
    loops: list[Any] = [intake, link, *senders]

    def liveness() -> str | None:
        stale_after = max(120.0, 3 * config.sink_timeout_seconds + 30)
        dead = [t.name for t in threads if not t.is_alive()]
        stale = [
            t.name for t, loop in zip(threads, loops, strict=True) if time.monotonic() - loop.heartbeat > stale_after
        ]
        return f"loops not running: {', '.join(dead + stale)}" if dead or stale else None

    def readiness() -> str | None:
        if not link.connected:
            return "not connected to the MQTT broker"
        if not link.subscribed:
            return "not subscribed yet"
        if intake.full_reason:
            return f"spool full: {intake.full_reason}"
        return None if spool.writable() else "spool is not writable"

    health = HealthServer(config.port, liveness=liveness, readiness=readiness, metrics=metrics)
    health.start()
    for thread in threads:
        thread.start()
    log.info("running", extra={"health_port": health.port, "sinks": [sink.name for sink in sinks]})

    stopping.wait()
    log.info(
        "stopping: no new messages are taken; flushing the spool",
        extra={"flush_seconds": config.shutdown_flush_seconds},
    )
    link.reading = False  # the broker keeps what was not read yet
    stop_intake.set()
    threads[0].join(timeout=5)  # spool what was already received, and hand over its acknowledgements
    stop_link.set()
    threads[1].join(timeout=5)  # the link sends them, then disconnects
    _flush(senders, config.shutdown_flush_seconds)
    stop_senders.set()
    for thread in threads[2:]:
        thread.join(timeout=2)
    for sink in sinks:
        _bounded(sink.close, seconds=3)
    left = spool.stats()
    log.info("stopped", extra={"records_kept_in_spool": left.records, "failed_loops": failed})
    health.stop()
    return EXIT_FAULT if failed else 0


def _flush(senders: list[Sender], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(sender.pending() for sender in senders):
        for sender in senders:
            sender.wakeup.set()
        time.sleep(0.1)


def _bounded(action: Callable[[], None], seconds: float) -> None:
    """Run a close that may block on an unreachable service, without letting it hold up the exit."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(timeout=seconds)


def _on_sigterm() -> threading.Event:
    stopping = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stopping


if __name__ == "__main__":
    sys.exit(main())
