"""End-to-end benchmark on real parts: Mosquitto → bridge (DEV) → Pub/Sub test server + BigQuery emulator.

    .venv/bin/python tools/benchmark.py [--readings 20000] [--sites 10]

Prints publish rate, intake rate (received and spooled), end-to-end rate to both sinks, the bridge's peak
memory, and the spool's size on disk. Figures, not pass/fail: compare them run to run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmi_bridge.config import Config
from fmi_bridge.provision import provision
from tests.pubsub_server import PubSubServer
from tests.support import (
    BigQueryEmulator,
    Bridge,
    Broker,
    PubSubReader,
    bq_query,
    publish,
    readings,
    wait_until,
)

PROJECT = "bench"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spool_size_mib(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.glob("spool.db*")) / 1024**2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--sites", type=int, default=10)
    args = parser.parse_args()
    per_site = args.readings // args.sites
    sites = [f"S{n:02d}" for n in range(args.sites)]
    messages = readings(sites, per_site)

    work = Path(tempfile.mkdtemp(prefix="fmi-bench-"))
    broker = Broker(work / "broker").start()
    pubsub = PubSubServer().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
    bigquery = BigQueryEmulator(work, PROJECT).start()
    env = {
        "APP_ENV": "DEV",
        "GCP_PROJECT_ID": PROJECT,
        "PUBSUB_TOPIC": "kpi",
        "BIGQUERY_DATASET": "bench",
        "BIGQUERY_TABLE": "readings",
        "PUBSUB_EMULATOR_HOST": pubsub.host,
        "BIGQUERY_EMULATOR_HOST": bigquery.url,
        "MQTT_PORT": str(broker.port),
        "LOG_LEVEL": "WARNING",
    }
    provision(Config.from_env(env))
    reader = PubSubReader(PROJECT, "kpi", "bench-sub")
    bq = bigquery.client()
    bridge = Bridge(work, env).start()
    try:
        bridge.wait_ready()
        assert bridge.process is not None
        print(f"{len(messages)} readings, {args.sites} sites, QoS 1, one publisher connection")

        started = time.monotonic()
        publisher = threading.Thread(target=publish, args=(broker.port, messages))
        publisher.start()
        publisher.join()
        published = time.monotonic()
        wait_until(lambda: bridge.metric("fmi_bridge_messages_received_total") >= len(messages), 300, "intake", 0.02)
        received = time.monotonic()
        reader.wait_for(len(messages), 600)
        in_pubsub = time.monotonic()
        wait_until(
            lambda: bq_query(bq, "SELECT COUNT(DISTINCT event_id) FROM `bench.bench.readings`")[0][0] >= len(messages),
            600,
            "BigQuery",
            0.2,
        )
        in_both = time.monotonic()

        def rate(seconds: float) -> str:
            return f"{len(messages) / seconds:,.0f} readings/s ({seconds:.2f} s)"

        print(f"publish (broker acknowledged):  {rate(published - started)}")
        print(f"intake (received and spooled):  {rate(received - started)}")
        print(f"end to end, Pub/Sub:            {rate(in_pubsub - started)}")
        print(f"end to end, both sinks:         {rate(in_both - started)}")
        print(f"bridge peak memory (VmHWM):     {peak_rss_mib(bridge.process.pid):.0f} MiB")
        print(f"spool on disk after the run:    {spool_size_mib(work / 'spool'):.1f} MiB")
    finally:
        bridge.stop()
        reader.close()
        bigquery.stop()
        pubsub.stop()
        broker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
