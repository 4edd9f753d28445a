"""The stop sequence on SIGTERM, inside one deadline (SHUTDOWN_FLUSH_SECONDS in all, under Supervisor's
stopwaitsecs and App Engine's 30 s):

1. the link stops reading: what the broker has not sent yet stays queued in the session;
2. the intake commits what was read and hands over its acknowledgements;
3. the link sends them and disconnects, without unsubscribing;
4. the senders drain the spool while time is left; what they cannot send stays spooled for the next start;
5. the senders stop and the clients close, bounded: an unreachable service cannot hold the exit.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from fmi_bridge.loops import Deadline, Loops, bounded

log = logging.getLogger(__name__)

STEP_CAP_SECONDS = 5.0  # intake and link each finish in well under a second unless something is stuck
CLOSE_SECONDS = 2.0  # kept back from the flush for stopping the senders and closing the clients


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_requested() -> threading.Event:
    """Set on SIGTERM (Supervisor, App Engine, the parent's death), SIGINT (a terminal's Ctrl-C) or SIGHUP (the
    terminal closed)."""
    stopping = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)
    return stopping


def stop_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux prctl PR_SET_PDEATHSIG), so a program Supervisor
    started never outlives it, however supervisord ends. Safe in a child between fork and exec."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_in_order(seconds: float, *, link: Any, loops: Loops, senders: Sequence[Any], sinks: Sequence[Any]) -> None:
    deadline = Deadline(seconds)
    link.reading = False
    stuck = loops.stop(["intake"], deadline.left(STEP_CAP_SECONDS, reserve=CLOSE_SECONDS))
    stuck += loops.stop(["mqtt"], deadline.left(STEP_CAP_SECONDS, reserve=CLOSE_SECONDS))
    while deadline.left(reserve=CLOSE_SECONDS) > 0 and any(sender.owed() for sender in senders):
        for sender in senders:
            sender.wakeup.set()
        time.sleep(0.1)
    stuck += loops.stop(loops.names("sender-"), deadline.left(reserve=CLOSE_SECONDS / 2))
    closing = Deadline(deadline.left())
    unclosed = [sink.lane for sink in sinks if not bounded(sink.close, closing.left())]
    if stuck or unclosed:
        log.warning("stop deadline reached", extra={"loops_still_running": stuck, "clients_not_closed": unclosed})
