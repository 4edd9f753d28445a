"""From MQTT callback to spool: validate, group-commit, then acknowledge to the broker.

The paho callback only enqueues (never blocks); this worker commits each group in one transaction and sends
the PUBACKs after the commit, so the broker keeps every message the spool does not hold yet.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from fmi_bridge.events import reading_row, reject_row
from fmi_bridge.logs import RateLimiter
from fmi_bridge.metrics import Metrics
from fmi_bridge.readings import Inbound, Reject, validate
from fmi_bridge.spool import READING, REJECT, Entry, Spool, SpoolError, SpoolFullError

log = logging.getLogger(__name__)

GROUP_MAX = 1000
RETRY_SECONDS = 1.0


class Intake:
    def __init__(
        self, spool: Spool, metrics: Metrics, ack: Callable[[Inbound], None], committed: Callable[[], None]
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self._ack = ack
        self._committed = committed
        self._queue: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._reject_log = RateLimiter()
        self.accepting = True
        self.full_reason: str | None = None
        self.heartbeat = time.monotonic()

    def offer(self, message: Inbound) -> None:
        """Called on paho's thread. Once stopping, a message is left un-acknowledged: the broker keeps it."""
        if self.accepting:
            self._queue.put(message)

    def run(self, stop: threading.Event) -> None:
        while True:
            self.heartbeat = time.monotonic()
            group = self._take()
            if not group:
                if stop.is_set():
                    return
                continue
            entries = [self._entry(message) for message in group]
            while group:
                committed = self._commit(entries)
                for message in group[:committed]:
                    self._ack(message)
                if committed:
                    self._committed()
                group, entries = group[committed:], entries[committed:]
                if group and stop.wait(RETRY_SECONDS):
                    return  # not acknowledged: the broker redelivers these to the next session
                self.heartbeat = time.monotonic()

    def _take(self) -> list[Inbound]:
        try:
            group = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(group) < GROUP_MAX:
            try:
                group.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return group

    def _entry(self, message: Inbound) -> Entry:
        self.metrics.received.inc()
        outcome = validate(message)
        if isinstance(outcome, Reject):
            self._count_reject(outcome)
            return Entry(REJECT, None, reject_row(outcome))
        self.metrics.accepted.inc()
        return Entry(READING, outcome.site_code, reading_row(outcome))

    def _count_reject(self, reject: Reject) -> None:
        self.metrics.rejected.labels(reject.reason).inc()
        allowed, held_back = self._reject_log.allow(reject.reason)
        if not allowed:
            self.metrics.logs_suppressed.inc()
            return
        log.warning(
            "message rejected",
            extra={
                "reason": reject.reason,
                "detail": reject.detail,
                "mqtt_topic": reject.mqtt_topic[:256],
                "suppressed_since_last": held_back,
            },
        )

    def _commit(self, entries: list[Entry]) -> int:
        """How many of the entries the spool took (from the first on); 0 while it has no room."""
        try:
            committed = self.spool.append(entries)
        except SpoolFullError as exc:
            self._hold(str(exc), len(entries), logging.WARNING)
            return 0
        except SpoolError as exc:
            self._hold(str(exc), len(entries), logging.ERROR)
            return 0
        if committed < len(entries):
            self._hold("spool is near its limit", len(entries) - committed, logging.WARNING)
        elif self.full_reason is not None:
            log.info("spool has room again; acknowledging messages", extra={"was": self.full_reason})
            self.full_reason = None
            self.metrics.backpressure.set(0)
        return committed

    def _hold(self, reason: str, messages: int, level: int) -> None:
        if self.full_reason is None:
            log.log(
                level,
                "spool cannot take messages; leaving them with the broker un-acknowledged",
                extra={"reason": reason, "messages_held": messages},
            )
            self.metrics.acks_withheld.inc(messages)
            self.metrics.backpressure.set(1)
        self.full_reason = reason
