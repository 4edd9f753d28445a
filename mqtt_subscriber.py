"""fmi-mqtt-bridge: MQTT sensor readings → validated KPI events → durable spool → Pub/Sub and BigQuery.

    python mqtt_subscriber.py                 run the bridge until SIGTERM
    python mqtt_subscriber.py check-config    print the effective configuration (secrets masked) and reach each
                                              endpoint; exit 0, 1 (an endpoint does not answer) or 2 (a bad setting)
    python mqtt_subscriber.py provision       create the Pub/Sub topic, dataset and tables; safe to repeat
    python mqtt_subscriber.py status          what the spool holds per sink, and files moved aside; read only
    python mqtt_subscriber.py spool-import F  take the pending records of spool file F (bridge stopped); safe to repeat
    python mqtt_subscriber.py replay --reason R [--since T] [--until T] [--dry-run]
                                              rejects of reason R validated again, the valid ones spooled as
                                              readings (bridge stopped); a second run skips what was replayed
    python mqtt_subscriber.py check-config --offline       validate only, reach no endpoint
    python mqtt_subscriber.py provision --subscription N   also an ordered subscription N for a consumer

The flow, top to bottom: configuration → spool → MQTT link → senders (one per lane) → intake → loops and health
→ wait for SIGTERM → stop in order within one deadline, keep the rest spooled.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from google.api_core.exceptions import GoogleAPIError, NotFound
from google.auth.exceptions import DefaultCredentialsError

from fmi_bridge import cloud, reach, spool_admin
from fmi_bridge.config import SETTINGS, Config, ConfigError
from fmi_bridge.health import HealthServer
from fmi_bridge.inbox import Inbox
from fmi_bridge.intake import Intake
from fmi_bridge.logs import setup_logging
from fmi_bridge.loops import Loops
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt_link import MqttLink
from fmi_bridge.provision import SCHEMAS, SUBSCRIPTION_NAME, ProvisionError, provision, schema_gaps
from fmi_bridge.readings import validate
from fmi_bridge.replay import replay
from fmi_bridge.senders import Sender
from fmi_bridge.shutdown import stop_in_order
from fmi_bridge.sink_bigquery import BigQuerySink, Destination, destinations
from fmi_bridge.sink_bigquery_write import RowEncoder, StorageWriteSink, stream_key
from fmi_bridge.sink_pubsub import PubSubSink
from fmi_bridge.sinks import BIGQUERY, LOG, PUBSUB, LogSink, Sink
from fmi_bridge.spool import Spool, SpoolError
from fmi_bridge.stats import StatsReporter

log = logging.getLogger("fmi_bridge")

EXIT_CONFIG = 2
EXIT_FAULT = 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    answered = help_or_unknown(args)
    if answered is not None:
        return answered
    try:
        options = command_line().parse_args(args or ["run"])
    except SystemExit as exc:  # argparse has printed the usage line and the problem on stderr
        return EXIT_CONFIG if exc.code else 0
    command: Callable[..., int] = options.handler
    try:
        config = load_config(needs_cloud=options.command in NEEDS_CLOUD and not getattr(options, "offline", False))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    try:
        return command(config, options)
    except DefaultCredentialsError as exc:  # found at start, then gone (a key file removed meanwhile)
        print(f"configuration error: no Google credentials: {cloud.HOW_TO_SUPPLY_CREDENTIALS} ({exc})", file=sys.stderr)
        return EXIT_CONFIG
    except GoogleAPIError as exc:  # e.g. provision against an unreachable or refusing API
        print(f"{options.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAULT


NEEDS_CLOUD = ("run", "check-config", "provision", "replay")
COMMANDS = ("check-config", "provision", "status", "spool-import", "replay")


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqtt_subscriber.py", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run").set_defaults(handler=run)
    check = commands.add_parser("check-config")
    check.add_argument("--offline", action="store_true", help="validate only; reach no endpoint")
    check.set_defaults(handler=check_config)
    provisioning = commands.add_parser("provision")
    provisioning.add_argument("--subscription", metavar="NAME", type=_subscription_name)
    provisioning.set_defaults(handler=provision_resources)
    commands.add_parser("status").set_defaults(handler=spool_status)
    importing = commands.add_parser("spool-import")
    importing.add_argument("file", metavar="FILE")
    importing.set_defaults(handler=spool_import)
    replaying = commands.add_parser("replay")
    replaying.add_argument("--reason", required=True, help="the rejects' reason, e.g. pubsub_rejected")
    replaying.add_argument("--since", type=_moment, help="received at or after (ISO 8601)")
    replaying.add_argument("--until", type=_moment, help="received before (ISO 8601)")
    replaying.add_argument("--dry-run", action="store_true", help="count only; spool and mark nothing")
    replaying.set_defaults(handler=replay_rejects)
    return parser


def _subscription_name(text: str) -> str:
    if not SUBSCRIPTION_NAME.fullmatch(text) or text.lower().startswith("goog"):
        raise argparse.ArgumentTypeError(
            "a subscription name is 3 to 255 letters, digits and -_.~+%, starts with a letter, not with goog"
        )
    return text


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2026-11-20T08:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def load_config(needs_cloud: bool) -> Config:
    """The environment's configuration; for commands that reach the cloud, also whether credentials exist."""
    config = Config.from_env()
    problem = cloud.credentials_problem(config) if needs_cloud else None
    if problem:
        raise ConfigError(problem)
    return config


def usage() -> str:
    """The title, the commands (this module's docstring) and every variable with its default, for --help."""
    title, commands = __doc__.split("\n\n")[:2] if __doc__ else ("", "")
    width = max(len(setting.name) for setting in SETTINGS)
    variables = "\n".join(
        f"    {setting.name:<{width}}  {setting.default if setting.default is not None else '-'}"
        for setting in SETTINGS
    )
    return (
        f"{title}\n\nCommands (each reads APP_ENV and the variables below from the environment):\n{commands}\n\n"
        f"Configuration, from the environment (README.md explains each):\n{variables}"
    )


def help_or_unknown(args: list[str]) -> int | None:
    """--help, or one line for a command that does not exist; None for a command to run."""
    if args[:1] in (["--help"], ["-h"], ["help"]):
        return print_help()
    if args and not args[0].startswith("-") and args[0] not in COMMANDS:
        print(
            f"mqtt_subscriber.py: unknown command {args[0]!r}; the commands are {', '.join(COMMANDS)}, and none "
            "runs the bridge (--help lists them)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return None


def print_help() -> int:
    try:
        print(usage(), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
    return 0


def check_config(config: Config, options: argparse.Namespace) -> int:
    described = config.describe()
    if options.offline:
        print(json.dumps(described, indent=2))
        return 0
    answered, failed = reach.check(config, config.setup_timeout_seconds)
    print(json.dumps({**described, "endpoints": answered}, indent=2))
    if failed:
        print(f"check-config: not answering: {'; '.join(failed)}", file=sys.stderr)
        return EXIT_FAULT
    return 0


def provision_resources(config: Config, options: argparse.Namespace) -> int:
    try:
        for line in provision(config, subscription=options.subscription):
            print(line)
    except ProvisionError as exc:
        print(f"provision failed: {exc}", file=sys.stderr)
        return EXIT_FAULT
    return 0


def replay_rejects(config: Config, options: argparse.Namespace) -> int:
    """Rejects of one reason, validated again; the valid ones spooled as readings (the bridge must be stopped,
    since one process owns the spool)."""
    if not config.bigquery_enabled:
        print(f"replay reads the rejects table, and BigQuery is off for APP_ENV={config.app_env}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        spool = None if options.dry_run else open_spool(config)
        client = cloud.bigquery_client(config)
        result = replay(config, client, spool, options.reason, since=options.since, until=options.until)
    except (SpoolError, RuntimeError) as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        return EXIT_FAULT
    except NotFound as exc:  # e.g. a dataset provisioned before the replay marks table existed
        missing = " ".join(str(exc.message).split())[:300]  # one line: a query job's message spans several
        print(f"replay failed: {missing}; `provision` creates what is missing", file=sys.stderr)
        return EXIT_FAULT
    print(json.dumps(asdict(result)))
    return 0


def spool_status(config: Config, options: argparse.Namespace) -> int:
    print(json.dumps(spool_admin.status(config.spool_dir), indent=2))
    return 0


def spool_import(config: Config, options: argparse.Namespace) -> int:
    try:
        spool = open_spool(config)
        result = spool_admin.import_spool(spool, Path(options.file), write_stream_keys(config))
    except SpoolError as exc:
        print(f"spool-import failed: {exc}", file=sys.stderr)
        return EXIT_FAULT
    print(json.dumps(asdict(result)))
    return 0


def write_stream_keys(config: Config) -> dict[str, tuple[str, str]] | None:
    """table -> (its lane's Storage Write stream key, the lane's record kind), as the sinks key them."""
    if not (config.bigquery_enabled and config.bigquery_write_method == "storage_write"):
        return None
    return {
        table.table: (stream_key(config.mqtt_client_id, table.table), table.kind) for table in bigquery_tables(config)
    }


def bigquery_tables(config: Config) -> tuple[Destination, Destination]:
    return destinations(
        cloud.table_id(config, config.bigquery_table), cloud.table_id(config, config.bigquery_rejects_table)
    )


def build_sinks(config: Config) -> list[Sink]:
    """One per lane: Pub/Sub's lanes (sites hashed onto them, one request per site in flight), and a BigQuery
    lane per table (readings, rejects), so a lane that fails holds up no other; with no BigQuery (plain LOCAL)
    the log sink stands in."""
    sinks: list[Sink] = []
    if config.pubsub_enabled:
        publisher = cloud.publisher_client(config)
        sinks += [
            PubSubSink(
                publisher,
                cloud.topic_path(config),
                lane=lane,
                lanes=config.pubsub_lanes,
                batch_size=config.pubsub_batch_size,
                deadletter_attempts=config.pubsub_deadletter_attempts,
                timeout=config.sink_timeout_seconds,
                sites_in_flight=config.pubsub_sites_in_flight,
                key_bytes_per_second=config.pubsub_key_bytes_per_second,
            )
            for lane in range(config.pubsub_lanes)
        ]
    if config.bigquery_enabled:
        tables = bigquery_tables(config)
        batch, timeout = config.bigquery_batch_size, config.sink_timeout_seconds
        if config.bigquery_write_method == "storage_write":
            writer = cloud.bigquery_write_client(config)
            encoders = (RowEncoder(SCHEMAS / "bigquery_readings.json"), RowEncoder(SCHEMAS / "bigquery_rejects.json"))
            sinks += [
                StorageWriteSink(
                    writer,
                    table,
                    encoder,
                    instance=config.mqtt_client_id,
                    batch_size=config.bigquery_append_rows,
                    timeout=timeout,
                    max_idle_seconds=config.bigquery_stream_max_idle_seconds,
                    in_flight=config.bigquery_appends_in_flight,
                )
                for table, encoder in zip(tables, encoders, strict=True)
            ]
        else:
            client = cloud.bigquery_client(config)
            sinks += [BigQuerySink(client, table, batch_size=batch, timeout=timeout) for table in tables]
    else:
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
        lanes={PUBSUB: config.pubsub_lanes} if PUBSUB in bits else {},
        offset_bits=BIGQUERY if BIGQUERY in bits and config.bigquery_write_method == "storage_write" else 0,
    )
    for bit, name in ((PUBSUB, "pubsub"), (BIGQUERY, "bigquery"), (LOG, "log")):
        if bit not in bits and (waiting := spool.count_pending(bit)):
            log.warning(
                "spool holds records for a sink this configuration does not run; they are kept",
                extra={"sink": name, "records": waiting},
            )
    return spool


def run(config: Config, options: argparse.Namespace | None = None) -> int:
    log.info("starting", extra={"config": config.describe()})
    warn_of_schema_gaps(config)
    metrics = Metrics()
    sinks = build_sinks(config)
    try:
        spool = open_spool(config)
    except SpoolError as exc:
        log.error("cannot open the spool; nothing was changed, exiting to be restarted", extra={"error": str(exc)})
        return EXIT_FAULT

    inbox = Inbox()  # paho's thread → intake, bounded: the link stops reading when it is full
    link = MqttLink(config, metrics, inbox)
    senders = [Sender(sink, spool, metrics) for sink in sinks]
    intake = Intake(
        spool,
        metrics,
        inbox,
        ack=link.ack_later,
        committed=lambda: wake(senders),
        validator=partial(validate, window=config.partition_window),
        log_rejects=config.bigquery_enabled,
    )
    sink_bits = {sink.name: sink.bit for sink in sinks}
    stats = StatsReporter(
        spool, metrics, sink_bits, interval=config.stats_log_seconds, lag_warn_seconds=config.sink_lag_warn_seconds
    )
    metrics.watch_spool(spool.stats)
    metrics.watch_inbox(inbox.__len__)
    metrics.watch_owed(lambda: {name: spool.owed(bit) for name, bit in sink_bits.items()}, stats.seconds_to_full)

    stopping = _on_sigterm()
    loops = Loops(stale_after=config.liveness_stall_seconds, on_failure=stopping.set)
    loops.add("intake", intake)
    loops.add("mqtt", link)
    for sender in senders:
        loops.add(f"sender-{sender.sink.lane}", sender)
    loops.add("stats", stats)
    checks = {"/liveness_check": loops.liveness, "/readiness_check": lambda: readiness(link, intake, spool)}
    health = HealthServer(config.port, checks=checks, host=config.listen_address)
    operators = HealthServer(config.metrics_port, checks=checks, host="127.0.0.1", metrics=metrics)
    health.start()
    operators.start()
    loops.start()
    log.info(
        "running",
        extra={"health_port": health.port, "metrics_port": operators.port, "sinks": [sink.lane for sink in sinks]},
    )

    stopping.wait()
    log.info(
        "stopping: no new messages are taken; flushing the spool",
        extra={"deadline_seconds": config.shutdown_flush_seconds},
    )
    stop_in_order(config.shutdown_flush_seconds, link=link, loops=loops, senders=senders, sinks=sinks)
    log.info("stopped", extra={"records_kept_in_spool": spool.stats().records, "failed_loops": loops.failed})
    health.stop()
    operators.stop()
    return EXIT_FAULT if loops.failed else 0


def warn_of_schema_gaps(config: Config) -> None:
    """A table without a column this release writes refuses every row that has it: say so once, at start."""
    if not config.bigquery_enabled:
        return
    try:
        gaps = schema_gaps(config, cloud.bigquery_client(config))
    except (GoogleAPIError, OSError):  # a missing table or an unreachable service: the sinks say so, and how
        return
    for table, columns in gaps.items():
        log.error(
            "table lacks columns this release writes: `python mqtt_subscriber.py provision` adds them",
            extra={"table": table, "columns": columns},
        )


def readiness(link: MqttLink, intake: Intake, spool: Spool) -> str | None:
    if not link.connected:
        return "not connected to the MQTT broker"
    if link.subscription_refused:
        return f"the broker refused the subscription, asking again: {link.subscription_refused}"
    if not link.subscribed:
        return "not subscribed yet"
    if intake.full_reason:
        return f"spool full: {intake.full_reason}"
    return None if spool.writable() else "spool is not writable"


def wake(senders: list[Sender]) -> None:
    for sender in senders:
        sender.wakeup.set()


def _on_sigterm() -> threading.Event:
    stopping = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stopping


if __name__ == "__main__":
    sys.exit(main())
