"""CPU per reading by stage, from a sampling profile of the running bridge (py-spy, a dev dependency: it reads
the process from outside, so the bridge runs unchanged).

    with Profile(pid, out) as profile: ...      # py-spy record --nonblocking --threads, 200 Hz
    print_table(profile.stacks(), cpu_seconds, readings)

CPU is measured per thread, exactly, from /proc/<pid>/task/<tid>/stat over the recording; py-spy's samples say
where in each thread it went. (Its samples alone mislead: threads waiting for the GIL count as running, so they
came to four times the process's CPU; with --gil it reports the last holder of a released GIL, idle time too.)
A stage's µs a reading is the sum over threads of the thread's CPU times the stage's share of its samples.

A sample belongs to the first frame, from the innermost outwards, that a rule names: a SQL statement run by
`Spool.settle` is "spool: settle", a JSON encoding inside `kpi_message` is "build the entry", a gRPC call under
a Pub/Sub sender is "Pub/Sub: send". Frames of the standard library and of Google's and paho's packages that no
rule names fall to the thread's own stage.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

SAMPLE_HZ = 200
FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")

# (file fragment, function or None for any, stage), tried in order for each frame.
RULES: tuple[tuple[str, str | None, str], ...] = (
    ("prometheus_client/", None, "metrics"),
    ("fmi_bridge/metrics.py", None, "metrics"),
    ("logging/__init__.py", None, "logging"),
    ("fmi_bridge/logs.py", None, "logging"),
    ("fmi_bridge/spool.py", "Spool._remember", "spool: dedupe (seen ids)"),
    ("fmi_bridge/spool.py", "Spool._new_entries", "spool: dedupe (seen ids)"),
    ("fmi_bridge/spool.py", "Spool.append", "spool: append (intake)"),
    ("fmi_bridge/spool.py", "entry", "intake: build the entry"),
    ("fmi_bridge/spool.py", "Spool.settle", "spool: settle"),
    ("fmi_bridge/spool.py", "Spool.start_write_stream", "spool: settle"),
    ("fmi_bridge/spool.py", "Spool.offset_batch", "spool: sinks' reads and offsets"),
    ("fmi_bridge/spool.py", "Spool.given_records", "spool: sinks' reads and offsets"),
    ("fmi_bridge/spool.py", "Spool.pending", "spool: sinks' reads and offsets"),
    ("fmi_bridge/spool.py", "Spool.pending_sites", "spool: sinks' reads and offsets"),
    ("fmi_bridge/spool.py", "Spool.sites_of_lane", "spool: sinks' reads and offsets"),
    ("fmi_bridge/spool.py", "Spool.count_pending", "spool: counts (owed, stats)"),
    ("fmi_bridge/spool.py", "Spool.stats", "spool: counts (owed, stats)"),
    ("fmi_bridge/spool.py", "Spool.owed", "spool: counts (owed, stats)"),
    ("fmi_bridge/spool.py", "_record", "spool: sinks' reads and offsets"),
    ("fmi_bridge/events.py", "kpi_message", "Pub/Sub: build messages"),  # the sinks' encoding, not intake's
    ("fmi_bridge/events.py", "kpi_message_of_body", "Pub/Sub: build messages"),
    ("fmi_bridge/events.py", "kpi_event", "Pub/Sub: build messages"),
    ("fmi_bridge/sinks/pubsub.py", "_add_message", "Pub/Sub: build messages"),
    ("fmi_bridge/readings.py", None, "intake: validation"),
    ("fmi_bridge/events.py", None, "intake: build the entry"),
    ("fmi_bridge/intake.py", None, "intake: other"),
    ("fmi_bridge/sinks/bigquery_write.py", "RowEncoder.encode", "BigQuery: encode rows"),
    ("fmi_bridge/sinks/bigquery_write.py", "micros", "BigQuery: encode rows"),
    ("fmi_bridge/sinks/bigquery_write.py", "StorageWriteSink._request", "BigQuery: encode rows"),
    ("fmi_bridge/sinks/pubsub.py", "PubSubSink._requests", "Pub/Sub: build messages"),
    ("fmi_bridge/mqtt/", None, "MQTT: receive and acknowledge"),
    ("paho/", None, "MQTT: receive and acknowledge"),
    ("http/server.py", None, "health and /metrics HTTP"),
    ("socketserver.py", None, "health and /metrics HTTP"),
)
# A thread's own stage, for frames no rule names (the gRPC and client libraries, the sender's own logic).
THREADS: tuple[tuple[str, str], ...] = (
    ("mqtt", "MQTT: receive and acknowledge"),
    ("intake", "intake: other"),
    ("sender-bigquery", "BigQuery: send and sender"),
    ("bigquery-append", "BigQuery: send and sender"),
    ("sender-pubsub", "Pub/Sub: send and sender"),
    ("publish-", "Pub/Sub: send and sender"),  # the Publish calls in flight (the sink's executor)
    ("ThreadPoolExecutor", "Pub/Sub: send and sender"),
    ("stats", "stats line"),
    ("health", "health and /metrics HTTP"),
)


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("py-spy not found: `make setup` installs the dev requirements (requirements-dev.txt)")
    return found


class Profile:
    """py-spy recording one process from outside, for as long as the `with` block runs."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profile:
        self.cpu_before = thread_cpu(self.pid)
        command = [py_spy(), "record", "-p", str(self.pid), "-r", str(SAMPLE_HZ), "--nonblocking", "--threads"]
        command += ["-f", "raw", "-o", str(self.out)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        assert self._process is not None
        after = thread_cpu(self.pid)
        self.cpu = {tid: seconds - self.cpu_before.get(tid, 0.0) for tid, seconds in after.items()}
        self._process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def stacks(self) -> Counter[tuple[int, str, tuple[str, ...]]]:
        """(thread id, thread name, frames from the outermost) -> samples."""
        stacks: Counter[tuple[int, str, tuple[str, ...]]] = Counter()
        if not self.out.exists():
            return stacks
        for line in self.out.read_text(errors="replace").splitlines():
            path, _, count = line.rpartition(" ")
            if not count.isdigit() or not path.startswith("thread ("):
                continue  # a frame's text broke the line (a thread named after a metric's help text)
            first, *frames = path.split(";")  # "thread (TID): name" (or no name), then the frames
            found = re.search(r"\((\d+)\)", first)
            tid = int(found[1]) if found else 0
            thread = first.split(": ", 1)[1] if ": " in first else "unnamed"
            stacks[(tid, thread, tuple(frames))] += int(count)
        return stacks


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of the process has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (proc(5), after the name)
    return used


def stage_of(thread: str, frames: Iterable[str]) -> str:
    for frame in reversed(tuple(frames)):  # the innermost first
        parsed = FRAME.match(frame)
        if parsed is None:
            continue
        function, file = parsed["function"], parsed["file"]
        for fragment, name, stage in RULES:
            if fragment in file and (name is None or function == name):
                return stage
    for prefix, stage in THREADS:
        if thread.startswith(prefix):
            return stage
    return "other (the main thread, garbage collection, …)"


def stage_table(stacks: Counter[tuple[int, str, tuple[str, ...]]], cpu: dict[int, float]) -> Counter[str]:
    """CPU seconds by stage: each thread's CPU split by where its samples fell."""
    by_thread: Counter[int] = Counter()
    for (tid, _, _), samples in stacks.items():
        by_thread[tid] += samples
    seconds: Counter[str] = Counter()
    for (tid, thread, frames), samples in stacks.items():
        seconds[stage_of(thread, frames)] += cpu.get(tid, 0.0) * samples / by_thread[tid]  # type: ignore[assignment]
    unsampled = sum(used for tid, used in cpu.items() if tid not in by_thread)
    if unsampled:
        seconds["threads py-spy never saw running (gRPC's own, …)"] += unsampled  # type: ignore[assignment]
    return seconds


def print_table(profile: Profile, readings: int) -> None:
    """CPU µs a reading by stage, and by thread."""
    stacks, cpu = profile.stacks(), profile.cpu
    total = sum(cpu.values())
    if not stacks or not total:
        print("  profile: no samples (py-spy could not read the process?)")
        return
    print(
        f"  profile: {sum(stacks.values()):,} samples at {SAMPLE_HZ} Hz; {total / readings * 1e6:.0f} µs CPU a reading"
    )
    for stage, seconds in stage_table(stacks, cpu).most_common():
        print(f"    {stage:<48}{seconds / total:6.1%}  {seconds / readings * 1e6:6.1f} µs")
    names = {tid: re.sub(r"-\d+(_\d+)?$", "", thread) for tid, thread, _ in stacks}
    threads: Counter[str] = Counter()
    for tid, used in cpu.items():
        threads[names.get(tid, "other threads")] += used  # type: ignore[assignment]
    shares = ", ".join(f"{name} {used / readings * 1e6:.0f} µs" for name, used in threads.most_common(8))
    print(f"  by thread (CPU a reading): {shares}")
