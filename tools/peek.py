"""See what reached the sinks, with the environment the bridge reads (the emulator hosts, GCP_PROJECT_ID):

.venv/bin/python tools/peek.py pubsub NAME [--wait SECONDS]   pull subscription NAME (made with
                                                               `provision --subscription NAME`), one JSON
                                                               line a message, acknowledged
.venv/bin/python tools/peek.py bigquery 'SELECT ...'            run a query, one JSON line a row
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.api_core.exceptions import DeadlineExceeded

from fmi_bridge import cloud
from fmi_bridge.config import Config, ConfigError


def pull(config: Config, name: str, wait: float) -> int:
    subscriber = cloud.subscriber_client(config)
    path = f"projects/{config.gcp_project_id}/subscriptions/{name}"
    deadline, pulled = time.monotonic() + wait, 0
    while True:
        # Up to --wait for the first message; once some came, a short pull says whether more are there.
        timeout = 1.0 if pulled else max(0.1, min(10.0, deadline - time.monotonic()))
        try:
            response = subscriber.pull(request={"subscription": path, "max_messages": 100}, timeout=timeout)
        except DeadlineExceeded:
            response = None
        if response is None or not response.received_messages:
            if pulled or time.monotonic() > deadline:
                break
            continue
        for received in response.received_messages:
            message = received.message
            attributes = dict(message.attributes)
            print(
                json.dumps(
                    {"ordering_key": message.ordering_key, "attributes": attributes, "data": json.loads(message.data)}
                )
            )
        ack_ids = [received.ack_id for received in response.received_messages]
        subscriber.acknowledge(request={"subscription": path, "ack_ids": ack_ids})
        pulled += len(ack_ids)
    print(f"{pulled} message(s) from {path}", file=sys.stderr)
    return 0 if pulled else 1


def query(config: Config, sql: str) -> int:
    rows = list(cloud.bigquery_client(config).query(sql, location=config.bigquery_location).result(timeout=60))
    for row in rows:
        print(json.dumps(dict(row.items()), default=str))
    print(f"{len(rows)} row(s)", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sinks = parser.add_subparsers(dest="sink", required=True)
    pubsub = sinks.add_parser("pubsub")
    pubsub.add_argument("subscription")
    pubsub.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a first message")
    sinks.add_parser("bigquery").add_argument("sql")
    options = parser.parse_args()
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if options.sink == "pubsub":
        return pull(config, options.subscription, options.wait)
    return query(config, options.sql)


if __name__ == "__main__":
    sys.exit(main())
