"""One sender per lane (a sink, or one destination table of a sink): drains the spool at its own pace, with its
own retries, so one sink or table down never stops another."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from fmi_bridge.backoff import Backoff
from fmi_bridge.logs import RateLimiter
from fmi_bridge.metrics import Metrics
from fmi_bridge.sinks.contract import Sink, SinkUnavailableError, WriteResult
from fmi_bridge.spool import Spool, SpoolDamagedError, SpoolError, is_corrupt, spool_error

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.2


class Sender:
    def __init__(self, sink: Sink, spool: Spool, metrics: Metrics) -> None:
        self.sink = sink
        self.spool = spool
        self.metrics = metrics
        self.wakeup: threading.Event = sink.wakeup or threading.Event()
        self.heartbeat = time.monotonic()
        self._backoff = Backoff(initial=0.5, maximum=10.0)
        self._error_log = RateLimiter(per_second=0.2, burst=3)
        # What the sink confirmed but the spool has not recorded yet (e.g. disk full): settled before anything
        # else, and never sent again meanwhile.
        self._unsettled = WriteResult()
        self._down_since: float | None = None  # when the lane's current run of failures began
        sink.on_progress = self._progressed

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                progressed = self._round()
            except SinkUnavailableError as exc:
                self._failed(exc.code)
                self._warn("sink unavailable", str(exc), self.owed())
                progressed = False
            except SpoolDamagedError:
                raise  # the loop dies and the process exits: the next start moves the file aside
            except SpoolError as exc:  # e.g. disk full: nothing was sent; the same step is tried again later
                self._failed("SPOOL")
                self._warn("cannot record the lane's progress in the spool", str(exc), self.owed())
                progressed = False
            except Exception as exc:  # thread boundary: log, count, keep the loop alive
                if isinstance(exc, sqlite3.DatabaseError) and is_corrupt(exc):  # a read of the spool found damage
                    raise spool_error("spool read failed", exc) from exc  # names SQLite's code, SQLITE_CORRUPT
                log.exception("sender round failed", extra={"sink": self.sink.lane})
                self._failed("ERROR")
                progressed = False
            if progressed is None:
                self.wakeup.wait(IDLE_POLL_SECONDS)
                self.wakeup.clear()
            elif progressed:
                self._backoff.reset()
            else:
                self._down_since = self._down_since or time.monotonic()
                stop.wait(self._backoff.next_delay())

    def _failed(self, code: str) -> None:
        self.metrics.failed.labels(self.sink.name).inc()
        self.metrics.lane_failed.labels(self.sink.lane, code).inc()

    def _track_health(self, result: WriteResult) -> None:
        """Down from a failure until a round delivers while no part of the lane still fails; then one line
        saying how long it was down and what it then owed."""
        if result.retry:
            self._down_since = self._down_since or time.monotonic()
            return
        if self._down_since is None or not (result.done or result.dead_letters):
            return
        if self.sink.failing:  # a sink that backs off per site: one site still waits
            return
        log.info(
            "sink recovered",
            extra={
                "sink": self.sink.lane,
                "down_seconds": round(time.monotonic() - self._down_since, 1),
                "owed_records": self.owed(),
            },
        )
        self._down_since = None

    def _round(self) -> bool | None:
        """None when there was nothing to send (or only answers to wait for), else whether anything left the
        spool."""
        if not self._settle_unsettled():
            return False
        batch = self.sink.next_batch(self.spool)
        if not batch and not self.sink.busy:  # a sink with requests in flight collects them
            return None
        started = time.monotonic()
        try:
            result = self.sink.write(batch)
        except SinkUnavailableError:
            raise  # the batch stays in the spool; run() waits a backoff and says what to do
        except Exception as exc:  # a sink fault must not lose the batch: it stays in the spool
            log.exception("sink write failed", extra={"sink": self.sink.lane})
            result = WriteResult(retry=[record.id for record in batch], error=str(exc), code="ERROR")
        for seconds in [time.monotonic() - started] if result.seconds is None else result.seconds:
            self.metrics.send_seconds.labels(self.sink.name).observe(seconds)
        self._keep(result)
        self._count(result)
        self._track_health(result)
        if not self._settle_unsettled():
            return False
        if result.done or result.dead_letters:
            return True
        return False if result.retry and result.hold_lane else None

    def _progressed(self, result: WriteResult) -> None:
        """Part of a write settled (or just answered) while the write goes on."""
        self.heartbeat = time.monotonic()
        if result.done or result.dead_letters:
            self._keep(result)
            self._count(result)
            self._settle_unsettled()  # a failure keeps them for the round's own settle

    def _keep(self, result: WriteResult) -> None:
        """What the sink confirmed, to settle (added to what an earlier settle could not record)."""
        self._unsettled.done += result.done
        self._unsettled.dead_letters += result.dead_letters
        self._unsettled.take_back = result.take_back or self._unsettled.take_back

    def _settle_unsettled(self) -> bool:
        unsettled = self._unsettled
        if not (unsettled.done or unsettled.dead_letters or unsettled.take_back):
            return True
        try:
            self.spool.settle(self.sink.bit, unsettled.done, unsettled.dead_letters, unsettled.take_back)
        except SpoolError as exc:
            self.metrics.failed.labels(self.sink.name).inc()
            self.metrics.settle_failed.labels(self.sink.name).inc(
                len(self._unsettled.done) + len(self._unsettled.dead_letters)
            )
            self._warn("cannot record confirmed records in the spool; they are kept, not sent again", str(exc), 0)
            return False
        self._unsettled = WriteResult()
        return True

    def _count(self, result: WriteResult) -> None:
        name = self.sink.name
        self.metrics.sent.labels(name).inc(len(result.done))
        self.metrics.dead_lettered.labels(name).inc(len(result.dead_letters))
        if result.retry:
            self._failed(result.code or "ERROR")
            self.metrics.retried.labels(name).inc(len(result.retry))
            self._warn(
                "sink did not take every record; they stay in the spool and are sent again",
                result.error,
                len(result.retry),
            )

    def _warn(self, message: str, error: str | None, records: int) -> None:
        allowed, held_back = self._error_log.allow(self.sink.lane)
        if allowed:
            log.warning(
                message,
                extra={"sink": self.sink.lane, "records": records, "error": error, "suppressed_since_last": held_back},
            )

    def owed(self) -> int:
        """Records this lane still has to send or to settle."""
        return self.sink.owed(self.spool)


def wake(senders: list[Sender]) -> None:
    """Intake committed records: every lane has something new."""
    for sender in senders:
        sender.wakeup.set()
