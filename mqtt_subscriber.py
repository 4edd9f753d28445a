"""fmi-mqtt-bridge: MQTT sensor readings → validated KPI events → durable spool → Pub/Sub and BigQuery.

    python mqtt_subscriber.py            run the bridge until SIGTERM
    python mqtt_subscriber.py --help     the operator commands (fmi_bridge/commands/) and every variable

The flow, top to bottom: configuration → spool → MQTT link → senders (one per lane) → intake → loops and health
→ wait for SIGTERM → stop in order within one deadline, keep the rest spooled.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial

from fmi_bridge.assembly import build_sinks, open_spool, readiness, warn_of_schema_gaps
from fmi_bridge.commands import cli
from fmi_bridge.config import Config, ConfigError
from fmi_bridge.health import HealthServer
from fmi_bridge.intake import Intake
from fmi_bridge.logs import setup_logging
from fmi_bridge.loops import Loops
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt.inbox import Inbox
from fmi_bridge.mqtt.link import MqttLink
from fmi_bridge.preflight import UnusableError, folder_problem
from fmi_bridge.readings import validate
from fmi_bridge.shutdown import stop_in_order, stop_requested, stop_with_parent
from fmi_bridge.sinks.sender import Sender, wake
from fmi_bridge.spool import SpoolError, SpoolInUseError
from fmi_bridge.stats import StatsReporter

log = logging.getLogger("fmi_bridge")


def main(argv: list[str] | None = None) -> int:
    options = cli.parse(sys.argv[1:] if argv is None else argv)
    if isinstance(options, int):  # --help, an unknown command or refused arguments: answered already
        return options
    try:
        config = cli.load_config(options)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG
    setup_logging(config.log_level)
    return cli.execute(options.handler or run, config, options)


def run(config: Config, options: argparse.Namespace | None = None) -> int:
    if os.environ.get("SUPERVISOR_ENABLED"):  # set by supervisord for its programs
        stop_with_parent()  # however supervisord ends, this process does not outlive it
    metrics = Metrics()
    try:  # what this machine must give before anything starts: the ports, bound now, and the spool's folder
        health = HealthServer("PORT", config.port, host=config.listen_address)
        operators = HealthServer("METRICS_PORT", config.metrics_port, host="127.0.0.1", metrics=metrics)
        if problem := folder_problem("SPOOL_DIR", config.spool_dir):
            raise UnusableError(problem)
    except UnusableError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG
    log.info("starting", extra={"config": config.describe()})
    warn_of_schema_gaps(config)
    sinks = build_sinks(config)
    try:
        spool = open_spool(config)
    except SpoolInUseError as exc:  # a second bridge on the same folder: a setting to change, not a fault
        print(f"configuration error: SPOOL_DIR={config.spool_dir}: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG
    except SpoolError as exc:
        log.error("cannot open the spool; nothing was changed, exiting to be restarted", extra={"error": str(exc)})
        return cli.EXIT_FAULT

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
        spool,
        metrics,
        sink_bits,
        interval=config.stats_log_seconds,
        lag_warn_seconds=config.sink_lag_warn_seconds,
        site_counts=intake.take_site_counts,
    )
    metrics.watch_spool(spool.stats)
    metrics.watch_count(
        "fmi_bridge_duplicates_total",
        "Messages delivered again (broker redelivery, a publisher's resend) acknowledged and not spooled twice",
        lambda: spool.duplicates,
    )
    metrics.watch_inbox(inbox.__len__)
    metrics.watch_owed(lambda: {name: spool.owed(bit) for name, bit in sink_bits.items()}, stats.seconds_to_full)

    stopping = stop_requested()
    loops = Loops(stale_after=config.liveness_stall_seconds, on_failure=stopping.set)
    loops.add("intake", intake)
    loops.add("mqtt", link)
    for sender in senders:
        loops.add(f"sender-{sender.sink.lane}", sender)
    loops.add("stats", stats)
    checks = {"/liveness_check": loops.liveness, "/readiness_check": lambda: readiness(link, intake, spool)}
    loops.start()
    # Answered from here on: probes that came while the spool opened waited in the listen backlog, and a loop
    # not yet started would have read as a dead one.
    health.start(checks)
    operators.start(checks)
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
    return cli.EXIT_FAULT if loops.failed else 0


if __name__ == "__main__":
    sys.exit(main())
