"""From the inbox to the spool: validate, group-commit, then hand the acknowledgements to the MQTT link.

The paho callback only puts into the bounded inbox; this worker commits each group in one transaction and only
then passes the messages back for their PUBACKs (sent by the link's own thread), so the broker keeps every
message the spool does not hold yet. Whatever one message does, it ends as a reading or a reject.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from fmi_bridge.events import reading_row, reject_row
from fmi_bridge.logs import RateLimiter
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt.inbox import Inbox
from fmi_bridge.readings import UNPROCESSABLE, Inbound, Reading, Reject, payload_text, validate
from fmi_bridge.sinks.contract import REJECT_LOG_MESSAGE
from fmi_bridge.spool import READING, REJECT, Entry, Spool, SpoolDamagedError, SpoolError, SpoolFullError, entry

log = logging.getLogger(__name__)

GROUP_MAX = 1000
RETRY_SECONDS = 1.0


class Intake:
    def __init__(
        self,
        spool: Spool,
        metrics: Metrics,
        inbox: Inbox,
        *,
        ack: Callable[[list[Inbound]], None],
        committed: Callable[[], None],
        validator: Callable[[Inbound], Reading | Reject] = validate,
        log_rejects: bool = True,
    ) -> None:
        self.spool = spool
        self._validate = validator
        self._log_rejects = log_rejects  # False where the log itself is the rejects' sink: each logged once
        self.metrics = metrics
        self.inbox = inbox
        self._ack = ack
        self._committed = committed
        self._reject_log = RateLimiter()
        self.full_reason: str | None = None
        self.heartbeat = time.monotonic()
        self._sites: Counter[str] = Counter()  # valid readings per site since the stats line last took them
        self._sites_lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set and the inbox is empty (the link stops reading first, so it empties)."""
        while True:
            self.heartbeat = time.monotonic()
            group = self.inbox.take(GROUP_MAX, timeout=0.2)
            if not group:
                if stop.is_set():
                    return
                continue
            entries = self.entries(group)
            while group:
                committed = self._commit(entries)
                if committed:
                    self._ack(group[:committed])
                    self.metrics.spooled_bytes.inc(sum(e.size for e in entries[:committed]))
                    self._committed()
                group, entries = group[committed:], entries[committed:]
                if group and stop.wait(RETRY_SECONDS):
                    return  # not acknowledged: the broker redelivers these to the next session
                self.heartbeat = time.monotonic()

    def entries(self, group: list[Inbound]) -> list[Entry]:
        """The messages as spool entries, each a reading or a reject with a reason; counted once for the group
        (a counter's lock a message was a few per cent of the intake). Never raises."""
        entries = [self._to_entry(message) for message in group]
        sites = [e.site_code or "" for e in entries if e.kind == READING]
        self.metrics.received.inc(len(group))
        self.metrics.accepted.inc(len(sites))
        with self._sites_lock:
            self._sites.update(sites)
        return entries

    def _to_entry(self, message: Inbound) -> Entry:
        try:
            outcome = self._validate(message)
            if not isinstance(outcome, Reject):
                return entry(READING, outcome.site_code, reading_row(outcome), key=outcome.event_id)
        except Exception as exc:  # one message boundary: whatever it does, it becomes a reject, never a dead intake
            outcome = Reject(
                UNPROCESSABLE,
                f"{type(exc).__name__}: {exc}"[:500],
                message.topic,
                payload_text(message.payload),
                message.received_at,
            )
        self._count_reject(outcome)
        row = reject_row(outcome)
        return entry(REJECT, None, row, key=row["reject_id"])

    def take_site_counts(self) -> Counter[str]:
        """Valid readings per site since the last call (the stats line's per-site figures)."""
        with self._sites_lock:
            counts, self._sites = self._sites, Counter()
        return counts

    def _count_reject(self, reject: Reject) -> None:
        self.metrics.rejected.labels(reject.reason).inc()
        if not self._log_rejects:
            return
        allowed, held_back = self._reject_log.allow(reject.reason)
        if not allowed:
            self.metrics.logs_suppressed.inc()
            return
        log.warning(
            REJECT_LOG_MESSAGE,
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
        except SpoolDamagedError:
            raise  # holding for ever would look alive: the loop dies, the process exits and is restarted
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
