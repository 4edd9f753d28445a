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

The command line: the parser, --help, the configuration each command needs, and the operator commands' handlers
(the bridge itself, `run`, is the entry point's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.api_core.exceptions import GoogleAPIError, NotFound
from google.auth.exceptions import DefaultCredentialsError

from fmi_bridge import cloud
from fmi_bridge.assembly import open_spool, write_stream_keys
from fmi_bridge.commands import reach, spool_admin
from fmi_bridge.commands.provision import SUBSCRIPTION_NAME, ProvisionError, provision, schema_state
from fmi_bridge.commands.replay import REPLAYABLE_REASONS, replay
from fmi_bridge.config import SETTINGS, Config, ConfigError
from fmi_bridge.spool import SpoolError

EXIT_CONFIG = 2
EXIT_FAULT = 1

NEEDS_CLOUD = ("run", "check-config", "provision", "replay")
COMMANDS = ("check-config", "provision", "status", "spool-import", "replay")

Handler = Callable[[Config, argparse.Namespace], int]


def parse(args: list[str]) -> argparse.Namespace | int:
    """The command and its options; or the exit code when it was answered here (--help, an unknown command,
    arguments argparse refused, which it has explained on stderr). `handler` is None for `run`."""
    answered = help_or_unknown(args)
    if answered is not None:
        return answered
    try:
        return command_line().parse_args(args or ["run"])
    except SystemExit as exc:
        return EXIT_CONFIG if exc.code else 0


def load_config(options: argparse.Namespace) -> Config:
    """The environment's configuration; for commands that reach the cloud, also whether credentials exist."""
    config = Config.from_env()
    needs_cloud = options.command in NEEDS_CLOUD and not getattr(options, "offline", False)
    problem = cloud.credentials_problem(config) if needs_cloud else None
    if problem:
        raise ConfigError(problem)
    return config


def execute(handler: Handler, config: Config, options: argparse.Namespace) -> int:
    """The command's exit code; what the cloud answered that no command expects is one line on stderr."""
    try:
        return handler(config, options)
    except DefaultCredentialsError as exc:  # found at start, then gone (a key file removed meanwhile)
        print(f"configuration error: no Google credentials: {cloud.HOW_TO_SUPPLY_CREDENTIALS} ({exc})", file=sys.stderr)
        return EXIT_CONFIG
    except GoogleAPIError as exc:  # e.g. provision against an unreachable or refusing API
        print(f"{options.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAULT


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqtt_subscriber.py", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run").set_defaults(handler=None)
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
    report: dict[str, Any] = {**described, "endpoints": answered}
    if config.pubsub_enabled and not failed:
        try:
            report["topic_schema"] = schema_state(config, cloud.publisher_client(config))
        except GoogleAPIError as exc:  # a missing topic, a missing grant: said, not fatal (provision makes it)
            report["topic_schema"] = f"unknown: {type(exc).__name__}: {str(exc)[:200]}"
    print(json.dumps(report, indent=2))
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
    if options.reason not in REPLAYABLE_REASONS:
        known = ", ".join(sorted(REPLAYABLE_REASONS))
        print(f"replay --reason {options.reason}: no such reason; the bridge writes {known}", file=sys.stderr)
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
