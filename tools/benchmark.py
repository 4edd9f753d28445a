"""Benchmark on real parts, every component in a process of its own: Mosquitto, the publisher, the bridge, the
Pub/Sub backend (Google's emulator, or the in-repo server) and bqemulator.

    .venv/bin/python tools/benchmark.py e2e      [--readings 30000] [--sites 10] [--pubsub google|server]
    .venv/bin/python tools/benchmark.py backlog  [--readings 100000] [--sites 10] [--pubsub google|server]
    (both also [--bigquery storage_write|insert_all] [--latency-model] [--profile])
    .venv/bin/python tools/benchmark.py baseline [--messages 300] [--latency 0.02]

e2e: publish start → every reading in both sinks, beside a bare paho subscriber (MQTT 5 and 3.1.1) that only
counts and acknowledges, measured on the same broker in the same run; CPU per reading from /proc.
backlog: N readings spooled while both sinks are unreachable, then a fresh bridge with the sinks up: drain rate
and peak RSS, beside how busy each emulator was. --profile: a py-spy recording of the bridge over the measured
window, CPU µs a reading by stage (tools/profile_stages.py). baseline: the original design (one synchronous
publish and one single-row insert per message, in the MQTT callback) against sinks with added latency, beside
the bridge against the same sinks.
Figures, not pass/fail: compare them run to run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402  (after the path set-up above)
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import bigquery, pubsub_v1  # noqa: E402
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from fmi_bridge.cloud import emulator_transport  # noqa: E402
from fmi_bridge.commands.provision import provision  # noqa: E402
from fmi_bridge.config import Config  # noqa: E402
from fmi_bridge.events import kpi_message, reading_row  # noqa: E402
from fmi_bridge.readings import Inbound, Reading, validate  # noqa: E402
from tests.sinks.bigquery_write_conformance import WriteApiConformance, table_info_from  # noqa: E402
from tests.sinks.pubsub_conformance import PubSubConformanceLayer  # noqa: E402
from tests.support import (  # noqa: E402
    BigQueryEmulator,
    Bridge,
    Broker,
    GooglePubSubEmulator,
    free_port,
    publish,
    readings,
    wait_until,
)
from tools.profile_stages import Profile, print_table  # noqa: E402

PROJECT = "bench"
# The latency model: a round trip to Google from a site's network, and opening an AppendRows connection
# (0.25-0.4 s measured in googleapis/python-bigquery-storage#284).
MODEL_ROUND_TRIP_SECONDS = 0.03
MODEL_CONNECT_SECONDS = 0.3
TOPIC_FILTER = "FCTS/FAE/+/SolvExtract/+"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- child processes -----------------------------------------------------------------------------------------


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def run_publisher(port: int, count: int, sites: int, start: int = 0) -> subprocess.Popen[str]:
    return child(
        "_publish", "--port", str(port), "--readings", str(count), "--sites", str(sites), "--start", str(start)
    )


def publisher_main(options: argparse.Namespace) -> int:
    names = [f"S{n:02d}" for n in range(options.sites)]
    messages = readings(names, options.readings // options.sites, start=options.start)
    for first in range(0, len(messages), 60_000):  # one connection carries at most 65,535 QoS 1 message ids
        publish(options.port, messages[first : first + 60_000])
    return 0


def bare_main(options: argparse.Namespace) -> int:
    """A subscriber that only counts and acknowledges: paho's own ceiling on this broker."""

    v5 = options.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"bare-{options.protocol}-{os.getpid()}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=True,
        **({} if v5 else {"clean_session": True}),
    )
    state = {"count": 0, "last": 0.0}

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        client.ack(message.mid, message.qos)
        state["count"] += 1
        state["last"] = time.monotonic()

    client.on_message = on_message
    if v5:
        properties = Properties(1)  # CONNECT
        properties.ReceiveMaximum = 1000
        client.connect("127.0.0.1", options.port, properties=properties)
    else:
        client.connect("127.0.0.1", options.port)
    client.subscribe(TOPIC_FILTER, options=SubscribeOptions(qos=1)) if v5 else client.subscribe(TOPIC_FILTER, 1)
    for _ in range(50):
        client.loop(0.05)
    print("subscribed", flush=True)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    while state["count"] < options.count:
        client.loop(1.0)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    print(json.dumps({"last": state["last"], "cpu": cpu}), flush=True)
    return 0


# -- the set-up ------------------------------------------------------------------------------------------------


@dataclass
class Rig:
    work: Path
    broker: Broker
    bigquery: BigQueryEmulator
    pubsub_host: str
    pubsub_pid: int
    env: dict[str, str]
    layer: PubSubConformanceLayer  # the bridge publishes through it, as in the tests
    write_layer: WriteApiConformance  # the Write API, likewise

    def conformance(self) -> None:
        """Whether Google's rules held over the run: refusals, and the busiest ordering key's second."""
        busiest = max((self.layer.most_bytes_in_a_second(key) for key in list(self.layer.key_history)), default=0)
        print(
            f"  conformance layer: {self.layer.requests:,} Publish requests, {len(self.layer.refusals)} refused "
            f"{sorted(set(self.layer.refusals))}; busiest ordering key {busiest:,} bytes in one second "
            "(Google's limit 1,000,000)"
        )
        if self.env.get("BIGQUERY_WRITE_METHOD") == "storage_write":
            w = self.write_layer
            print(
                f"  Write API layer: {w.passed_appends:,} appends on {w.connections} connections, "
                f"{len(w.refusals)} refused {sorted({rule for rule, _ in w.refusals})}"
            )

    def parts(self, bridge: Bridge) -> dict[str, int]:
        """The processes that share the machine's cores during a measurement."""
        assert bridge.process is not None and self.bigquery.process is not None
        return {
            "bridge": bridge.process.pid,
            "Pub/Sub": self.pubsub_pid,
            "bqemulator": self.bigquery.process.pid,
            "this script (conformance layer, readers)": os.getpid(),
        }


@contextmanager
def rig(
    pubsub: str, latency: float = 0.0, bigquery_method: str = "insert_all", latency_model: bool = False
) -> Iterator[Rig]:
    """Broker, emulators and conformance layers; `latency_model`: both sinks answer a round trip later, and a
    new AppendRows connection costs what one costs against Google's service."""
    work = Path(tempfile.mkdtemp(prefix="fmi-bench-"))
    broker = Broker(work / "broker").start()
    bigquery = BigQueryEmulator(work, PROJECT).start()
    helpers: list[subprocess.Popen[str]] = []
    google = None
    if pubsub == "google":
        google = GooglePubSubEmulator(work).start()
        pubsub_host = google.host
        assert google.process is not None
        pubsub_pid = google.process.pid
    else:
        port = free_port()
        server = [sys.executable, "-m", "tests.sinks.pubsub_server", "--port", str(port), "--latency", str(latency)]
        helpers.append(subprocess.Popen(server, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        assert helpers[-1].stdout is not None
        helpers[-1].stdout.readline()
        pubsub_host = f"127.0.0.1:{port}"
        pubsub_pid = helpers[-1].pid
    bigquery_url = bigquery.url
    if latency:
        proxy = [sys.executable, "-m", "tests.sinks.bigquery_proxy", "--upstream", bigquery.url]
        proxy += ["--latency", str(latency)]
        helpers.append(subprocess.Popen(proxy, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        assert helpers[-1].stdout is not None
        bigquery_url = helpers[-1].stdout.readline().split()[-1]
    layer = PubSubConformanceLayer(pubsub_host).start()
    write_layer = WriteApiConformance(bigquery.grpc_host, table_info_from(bigquery.client())).start()
    if latency_model:
        layer.round_trip_seconds = write_layer.round_trip_seconds = MODEL_ROUND_TRIP_SECONDS
        write_layer.connect_seconds = MODEL_CONNECT_SECONDS
    env = {
        "APP_ENV": "DEV",
        "GCP_PROJECT_ID": PROJECT,
        "PUBSUB_TOPIC": "kpi",
        "BIGQUERY_DATASET": "bench",
        "BIGQUERY_TABLE": "readings",
        "PUBSUB_EMULATOR_HOST": layer.host,
        "BIGQUERY_EMULATOR_HOST": bigquery_url,
        "BIGQUERY_WRITE_METHOD": bigquery_method,
        "MQTT_PORT": str(broker.port),
        "LOG_LEVEL": "WARNING",
    }
    if bigquery_method == "storage_write":
        env["BIGQUERY_STORAGE_EMULATOR_HOST"] = write_layer.host
    provision(Config.from_env({**env, "BIGQUERY_EMULATOR_HOST": bigquery.url}))
    try:
        yield Rig(work, broker, bigquery, pubsub_host, pubsub_pid, env, layer, write_layer)
    finally:
        layer.stop()
        write_layer.stop()
        for helper in helpers:
            helper.kill()
        if google is not None:
            google.stop()
        bigquery.stop()
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)  # spools, emulators' data and the profile: up to 100 MB a run


class Completion:
    """Counts distinct readings in both sinks, each poll reading only what is new (no quadratic re-decoding)."""

    def __init__(self, setup: Rig) -> None:

        self.subscriber = pubsub_v1.SubscriberClient(**emulator_transport(setup.pubsub_host, SubscriberGrpcTransport))
        self.subscription = f"projects/{PROJECT}/subscriptions/bench-{time.monotonic_ns()}"
        self.subscriber.create_subscription(
            request={
                "name": self.subscription,
                "topic": f"projects/{PROJECT}/topics/kpi",
                "enable_message_ordering": True,
            }
        )
        self.bq = setup.bigquery.client()
        self.pubsub_ids: set[str] = set()
        self.pubsub_done_at: float | None = None

    def pull(self) -> None:
        response = self.subscriber.pull(request={"subscription": self.subscription, "max_messages": 1000}, timeout=10)
        if response.received_messages:
            self.subscriber.acknowledge(
                request={"subscription": self.subscription, "ack_ids": [m.ack_id for m in response.received_messages]}
            )
            self.pubsub_ids.update(m.message.attributes["event_id"] for m in response.received_messages)

    def bigquery_rows(self) -> int:
        sql = "SELECT COUNT(DISTINCT event_id) FROM `bench.bench.readings`"
        return int(next(iter(self.bq.query(sql).result()))[0])

    def wait(self, count: int, timeout: float, bigquery_rows: int | None = None, bridge: Bridge | None = None) -> float:
        """Monotonic time when both sinks held `count` readings (BigQuery: `bigquery_rows`, if given). With a
        bridge on the Write API, BigQuery's side is read from the bridge's metrics until it has sent all: a
        query during an append can deadlock bqemulator."""
        deadline = time.monotonic() + timeout
        while len(self.pubsub_ids) < count:
            self.pull()
            if time.monotonic() > deadline:
                raise TimeoutError(f"Pub/Sub has {len(self.pubsub_ids)} of {count}")
        self.pubsub_done_at = time.monotonic()
        while bridge is not None and bridge.metric("fmi_bridge_sink_owed_records", 'sink="bigquery"') != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("BigQuery did not get every reading")
            time.sleep(0.05)
        while self.bigquery_rows() < (bigquery_rows or count):
            if time.monotonic() > deadline:
                raise TimeoutError("BigQuery did not get every reading")
            time.sleep(0.25)
        return time.monotonic()


class Acknowledged(threading.Thread):
    """When each sink had acknowledged every reading (a Publish or an append answered OK), read from the
    bridge's own counters every 100 ms. This is the bridge's drain; a subscriber or a query sees the readings
    later, at the emulator's own pace on this shared machine."""

    def __init__(self, bridge: Bridge, count: int) -> None:
        super().__init__(daemon=True)
        self.bridge = bridge
        self.count = count
        self.at: dict[str, float] = {}
        self.cpu_at_both = 0.0

    def run(self) -> None:
        assert self.bridge.process is not None
        while len(self.at) < 2 and self.bridge.process.poll() is None:
            for sink in ("pubsub", "bigquery"):
                if (
                    sink not in self.at
                    and self.bridge.metric("fmi_bridge_sink_sent_total", f'sink="{sink}"') >= self.count
                ):
                    self.at[sink] = time.monotonic()
            time.sleep(0.1)
        self.cpu_at_both = cpu_seconds(self.bridge.process.pid)


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s ({seconds:.1f} s)"


def report(
    what: str, count: int, completion: Completion, started: float, done: float, *, bridge: Bridge, acked: Acknowledged
) -> dict[str, float]:
    assert completion.pubsub_done_at is not None and bridge.process is not None
    acked.join(30)
    for sink, label in (("pubsub", "Pub/Sub"), ("bigquery", "BigQuery")):
        if sink in acked.at:
            print(f"{what + ', ' + label + ' acknowledged:':<36}{rate(count, acked.at[sink] - started)}")
    if len(acked.at) == 2:
        print(f"{what + ', both acknowledged:':<36}{rate(count, max(acked.at.values()) - started)}")
    print(f"{what + ', pulled from Pub/Sub:':<36}{rate(count, completion.pubsub_done_at - started)}")
    print(f"{what + ', seen in both sinks:':<36}{rate(count, done - started)}")
    print(f"  bridge peak RSS:                  {peak_rss_mib(bridge.process.pid):.0f} MiB")
    rates = {f"{sink} acknowledged": count / (at - started) for sink, at in acked.at.items()}
    return {**rates, "seen in both sinks": count / (done - started)}


def machine_cpu(parts: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process (the bridge, the emulators): who had the two cores."""
    return {name: cpu_seconds(pid) for name, pid in parts.items()}


def print_cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> None:
    used = ", ".join(f"{name} {after[name] - before[name]:.1f} s" for name in before)
    print(f"  CPU over those {seconds:.1f} s on {os.cpu_count()} cores: {used}")


# -- modes -----------------------------------------------------------------------------------------------------


def bare_drain(setup: Rig, count: int, sites: int, protocol: str) -> tuple[float, float]:
    """(readings/s from publish start to the last message, CPU µs per message) for a bare paho subscriber."""
    bare = child("_bare", "--port", str(setup.broker.port), "--protocol", protocol, "--count", str(count))
    assert bare.stdout is not None
    assert bare.stdout.readline().strip() == "subscribed"
    started = time.monotonic()
    run_publisher(setup.broker.port, count, sites).wait()
    result = json.loads(bare.stdout.readline())
    bare.wait()
    return count / (result["last"] - started), result["cpu"] / count * 1e6


def with_and_without_latency(options: argparse.Namespace, measure: Callable[..., dict[str, float]]) -> int:
    """One measurement; with --latency-model, the same without and then with it, and the ratios."""
    plain = measure(options, latency_model=False)
    if not options.latency_model:
        return 0
    print(f"\nthe same with the latency model: {MODEL_ROUND_TRIP_SECONDS * 1000:.0f} ms a round trip to both sinks, ")
    print(f"{MODEL_CONNECT_SECONDS * 1000:.0f} ms to open an AppendRows connection")
    modelled = measure(options, latency_model=True)
    for what in plain.keys() & modelled.keys():
        print(f"  {what + ', with / without:':<50}{modelled[what] / plain[what]:.2f}")
    return 0


def profiling(options: argparse.Namespace, bridge: Bridge, work: Path) -> Profile | nullcontext[None]:
    """A py-spy recording of the bridge for the measured window, with --profile; else nothing."""
    if not options.profile:
        return nullcontext()
    assert bridge.process is not None
    return Profile(bridge.process.pid, work / f"profile-{bridge.process.pid}.txt")


def ceilings(setup: Rig, before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """How busy each emulator was over the drain: a backend near one core (100 %) binds the rate, not the bridge."""
    busy = {name: (after[name] - before[name]) / seconds for name in ("Pub/Sub", "bqemulator")}
    return ", ".join(f"{name} {share:.0%} of a core" for name, share in busy.items())


def e2e(options: argparse.Namespace) -> int:
    return with_and_without_latency(options, e2e_once)


def backlog(options: argparse.Namespace) -> int:
    return with_and_without_latency(options, backlog_once)


def e2e_once(options: argparse.Namespace, *, latency_model: bool) -> dict[str, float]:
    count = options.readings // options.sites * options.sites
    with rig(options.pubsub, bigquery_method=options.bigquery, latency_model=latency_model) as setup:
        bare5 = bare_drain(setup, count, options.sites, "5")
        bare3 = bare_drain(setup, count, options.sites, "3")
        bridge = Bridge(setup.work, setup.env).start()
        try:
            bridge.wait_ready(60)
            assert bridge.process is not None
            completion = Completion(setup)
            cpu_before = machine_cpu(setup.parts(bridge))
            acked = Acknowledged(bridge, count)
            profile = profiling(options, bridge, setup.work)
            started = time.monotonic()
            acked.start()
            with profile:
                publisher = run_publisher(setup.broker.port, count, options.sites)
                done = completion.wait(count, 900, bridge=bridge if options.bigquery == "storage_write" else None)
            publisher.wait()
            cpu_after = machine_cpu(setup.parts(bridge))
            cpu = cpu_after["bridge"] - cpu_before["bridge"]
            bridge_rate = count / (done - started)
            print(f"{count:,} readings, {options.sites} sites, QoS 1; Pub/Sub: {options.pubsub}; {options.bigquery}")
            print(f"bare paho, MQTT 5:        {bare5[0]:,.0f}/s, {bare5[1]:.0f} µs CPU a message")
            print(f"bare paho, MQTT 3.1.1:    {bare3[0]:,.0f}/s, {bare3[1]:.0f} µs CPU a message")
            rates = report("bridge", count, completion, started, done, bridge=bridge, acked=acked)
            setup.conformance()
            print(f"  ratio to bare MQTT 5 (seen):      {bridge_rate / bare5[0]:.2f}")
            if len(acked.at) == 2:
                acked_rate = count / (max(acked.at.values()) - started)
                print(f"  ratio to bare MQTT 5 (acked):     {acked_rate / bare5[0]:.2f}")
            print(f"  bridge CPU a reading:             {cpu / count * 1e6:.0f} µs")
            print_cpu_share(cpu_before, cpu_after, done - started)
            if isinstance(profile, Profile):
                print_table(profile, count)
        finally:
            bridge.stop()
    return rates


def backlog_once(options: argparse.Namespace, *, latency_model: bool) -> dict[str, float]:
    count = options.readings // options.sites * options.sites
    with rig(options.pubsub, bigquery_method=options.bigquery, latency_model=latency_model) as setup:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: both sinks fail
        down = {**setup.env, "PUBSUB_EMULATOR_HOST": dead, "BIGQUERY_EMULATOR_HOST": f"http://{dead}"}
        if "BIGQUERY_STORAGE_EMULATOR_HOST" in down:
            down["BIGQUERY_STORAGE_EMULATOR_HOST"] = dead
        spooling = Bridge(setup.work, down).start()
        completion = Completion(setup)
        try:
            wait_until(lambda: spooling.status("/liveness_check")[0] == 200, 60, "the spooling bridge")
            run_publisher(setup.broker.port, count, options.sites).wait()
            wait_until(lambda: spooling.metric("fmi_bridge_spool_records") >= count, 900, "the backlog", 1)
            assert spooling.terminate(60) == 0
        finally:
            spooling.stop()
        draining = Bridge(setup.work, setup.env).start()
        try:
            profile = profiling(options, draining, setup.work)
            started = time.monotonic()
            cpu_before = machine_cpu(setup.parts(draining))
            acked = Acknowledged(draining, count)
            acked.start()
            with profile:
                done = completion.wait(count, 3600, bridge=draining if options.bigquery == "storage_write" else None)
            cpu_after = machine_cpu(setup.parts(draining))
            print(
                f"backlog of {count:,} readings, {options.sites} sites; Pub/Sub: {options.pubsub}; {options.bigquery}"
            )
            rates = report("drain", count, completion, started, done, bridge=draining, acked=acked)
            setup.conformance()
            bridge_cpu = acked.cpu_at_both - cpu_before["bridge"]
            print(f"  bridge CPU a reading (to acked):  {bridge_cpu / count * 1e6:.0f} µs")
            print_cpu_share(cpu_before, cpu_after, done - started)
            if isinstance(profile, Profile):
                print_table(profile, count)
            print(f"  emulators' own ceilings: {ceilings(setup, cpu_before, cpu_after, done - started)}")
        finally:
            draining.stop()
    return rates


def baseline(options: argparse.Namespace) -> int:
    """The original design against sinks that answer in `latency` seconds, then the bridge against the same."""

    with rig("server", latency=options.latency) as setup:
        os.environ["PUBSUB_EMULATOR_HOST"] = setup.pubsub_host
        publisher_client = pubsub_v1.PublisherClient()  # as the original: the high-level client, one at a time
        bq = bigquery.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": setup.env["BIGQUERY_EMULATOR_HOST"]},  # through the latency proxy
        )
        state = {"count": 0, "last": 0.0}

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            outcome = validate(Inbound(message.topic, bytes(message.payload), datetime.now(UTC)))
            assert isinstance(outcome, Reading)
            row = reading_row(outcome)
            data, attributes = kpi_message(row)
            publisher_client.publish("projects/bench/topics/kpi", data, **attributes).result()
            bq.insert_rows_json("bench.bench.readings", [row])
            state["count"] += 1
            state["last"] = time.monotonic()

        seed = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="seed")
        seed.on_message = on_message
        seed.connect("127.0.0.1", setup.broker.port)
        seed.subscribe(TOPIC_FILTER, 1)
        seed.loop_start()
        time.sleep(0.5)
        started = time.monotonic()
        run_publisher(setup.broker.port, options.messages, 10).wait()
        wait_until(lambda: state["count"] >= options.messages, 600, "the seed-style subscriber", 0.1)
        seed_rate = options.messages / (state["last"] - started)
        seed.loop_stop()
        seed.disconnect()

        count = options.bridge_readings
        bridge = Bridge(setup.work, setup.env).start()
        try:
            bridge.wait_ready(60)
            completion = Completion(setup)
            started = time.monotonic()
            run_publisher(setup.broker.port, count, 10, start=10_000).wait()
            done = completion.wait(count, 900, bigquery_rows=count + options.messages)  # the seed's rows are there
            bridge_rate = count / (done - started)
        finally:
            bridge.stop()
        print(f"sinks answering in {options.latency * 1000:.0f} ms")
        print(f"seed-style, one sync publish + one insert a message: {seed_rate:,.1f}/s ({options.messages} messages)")
        print(f"bridge, both sinks:                                  {bridge_rate:,.0f}/s ({count:,} readings)")
        print(f"  ratio:                                             {bridge_rate / seed_rate:,.0f} x")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, default in (("e2e", 30_000), ("backlog", 100_000)):
        mode = modes.add_parser(name)
        mode.add_argument("--readings", type=int, default=default)
        mode.add_argument("--sites", type=int, default=10)
        mode.add_argument("--pubsub", choices=("google", "server"), default="google")
        mode.add_argument("--bigquery", choices=("storage_write", "insert_all"), default="storage_write")
        mode.add_argument("--latency-model", action="store_true", help="measure again with sinks a round trip away")
        mode.add_argument("--profile", action="store_true", help="sample the bridge with py-spy: CPU by stage")
    mode = modes.add_parser("baseline")
    mode.add_argument("--messages", type=int, default=300)
    mode.add_argument("--latency", type=float, default=0.02)
    mode.add_argument("--bridge-readings", type=int, default=20_000)
    mode = modes.add_parser("_publish")
    for flag in ("--port", "--readings", "--sites", "--start"):
        mode.add_argument(flag, type=int, default=0)
    mode = modes.add_parser("_bare")
    mode.add_argument("--port", type=int)
    mode.add_argument("--protocol", choices=("5", "3"))
    mode.add_argument("--count", type=int)
    options = parser.parse_args()
    modes_run = {"e2e": e2e, "backlog": backlog, "baseline": baseline, "_publish": publisher_main, "_bare": bare_main}
    return modes_run[options.mode](options)


if __name__ == "__main__":
    sys.exit(main())
