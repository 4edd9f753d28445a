"""The bridge's long-running loops: each on a thread of its own, watched for liveness, and stopped in order
against one deadline.

A loop is any object with `run(stop: threading.Event)` and a `heartbeat` (monotonic time it last came round).
A loop that dies on an unexpected error stops the whole process (exit 1 for Supervisor to restart it): a
half-working bridge, say with intake but no sender, would only fill its spool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Loop(Protocol):
    heartbeat: float

    def run(self, stop: threading.Event) -> None: ...


class Deadline:
    """One budget for a whole sequence of steps."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, cap: float | None = None, reserve: float = 0.0) -> float:
        left = max(0.0, self.at - reserve - time.monotonic())
        return left if cap is None else min(cap, left)


@dataclass
class _Running:
    name: str
    loop: Loop
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Loops:
    def __init__(self, stale_after: float, on_failure: Callable[[], None]) -> None:
        self.stale_after = stale_after
        self._on_failure = on_failure
        self._loops: dict[str, _Running] = {}
        self.failed: list[str] = []

    def add(self, name: str, loop: Loop) -> None:
        self._loops[name] = _Running(name, loop)

    def start(self) -> None:
        for running in self._loops.values():
            running.thread = threading.Thread(target=self._guarded, args=(running,), name=running.name, daemon=True)
            running.thread.start()

    def _guarded(self, running: _Running) -> None:
        try:
            running.loop.run(running.stop)
        except Exception:  # thread boundary: a dead loop must not leave a half-working bridge
            log.exception("loop failed; stopping so the process is restarted", extra={"loop": running.name})
            self.failed.append(running.name)
            self._on_failure()

    def liveness(self) -> str | None:
        """None while every loop runs and has come round recently, else which ones do not."""
        now = time.monotonic()
        bad = [
            r.name
            for r in self._loops.values()
            if r.thread is None or not r.thread.is_alive() or now - r.loop.heartbeat > self.stale_after
        ]
        return f"loops not running: {', '.join(bad)}" if bad else None

    def stop(self, names: list[str], seconds: float) -> list[str]:
        """Ask these loops to stop and wait for them, all within `seconds`; return those still running."""
        chosen = [self._loops[name] for name in names]
        for running in chosen:
            running.stop.set()
        until = Deadline(seconds)
        for running in chosen:
            if running.thread is not None:
                running.thread.join(timeout=until.left())
        return [r.name for r in chosen if r.thread is not None and r.thread.is_alive()]

    def names(self, prefix: str) -> list[str]:
        return [name for name in self._loops if name.startswith(prefix)]


def bounded(action: Callable[[], Any], seconds: float) -> bool:
    """Run an action that may block on an unreachable service (a client's close) for at most `seconds`; True
    when it finished."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    return not thread.is_alive()
