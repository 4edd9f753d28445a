"""Pub/Sub sink: KPI events in spool order per site (ordering key = site_code).

Rules, per site:
- A transient failure (the client retries those by itself) leaves the site's records in the spool; the site is
  not sent again until the client has settled every earlier publish, so order holds without duplicating ahead.
  Publishes the client lands after their round stopped waiting count as confirmed and are not sent again.
- After any failure the ordering key is resumed (`resume_publish`) and the site waits a jittered backoff.
- INVALID_ARGUMENT on a batch sends that batch's records of the site again one at a time; a record refused
  alone `deadletter_attempts` times goes to the rejects table (reason `pubsub_rejected`) and the site moves on.
- Other sites are never held up by one site's failures.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures as cf
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.pubsub_v1.publisher.exceptions import PublishToPausedOrderingKeyException

from fmi_bridge.backoff import Backoff
from fmi_bridge.events import dead_letter_row, kpi_message
from fmi_bridge.sinks import PUBSUB, WriteResult
from fmi_bridge.spool import Record, Spool

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "pubsub_rejected"


class PubSubSink:
    name = lane = "pubsub"
    bit = PUBSUB

    def __init__(
        self, publisher: Any, topic_path: str, *, batch_size: int, deadletter_attempts: int, timeout: float
    ) -> None:
        self.publisher = publisher
        self.topic_path = topic_path
        self.batch_size = batch_size
        self.deadletter_attempts = deadletter_attempts
        self.timeout = timeout
        self._backoff: dict[str, tuple[Backoff, float]] = {}  # site -> (its backoff, not before)
        self._isolated: dict[str, int] = {}  # site -> last record id of its failed batch
        self._attempts: dict[int, int] = {}  # record id -> times refused when sent alone
        # site -> (record id, publish future) still running in the client after its round timed out
        self._unsettled: dict[str, list[tuple[int, Any]]] = {}
        self._to_resume: set[str] = set()

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit)

    # -- choosing what to send ---------------------------------------------------------------------------

    def confirmed_late(self) -> list[int]:
        """Publishes the client finished after their round gave up waiting: those that succeeded need no resend."""
        confirmed: list[int] = []
        for site, sent in list(self._unsettled.items()):
            if not all(future.done() for _, future in sent):
                continue
            del self._unsettled[site]
            confirmed += [record_id for record_id, future in sent if future.exception() is None]
            if any(future.exception() is not None for _, future in sent):
                self._to_resume.add(site)
        return confirmed

    def next_batch(self, spool: Spool) -> list[Record]:
        now = time.monotonic()
        for site in self._to_resume - set(self._unsettled):
            self.publisher.resume_publish(self.topic_path, site)
            self._to_resume.discard(site)
        held = {site for site, (_, not_before) in self._backoff.items() if not_before > now} | set(self._unsettled)
        batch = spool.pending(self.bit, self.batch_size, exclude_sites=held | set(self._isolated))
        for site, last_id in list(self._isolated.items()):
            if site in held:
                continue
            record = spool.first_pending_for_site(self.bit, site)
            if record is None or record.id > last_id:
                del self._isolated[site]  # its failed batch is through; the site is batched again next round
            else:
                batch.append(record)
        batch.sort(key=lambda record: record.id)
        return batch

    # -- sending -----------------------------------------------------------------------------------------

    def write(self, records: list[Record]) -> WriteResult:
        sent: list[tuple[Record, Any]] = []
        for record in records:
            data, attributes = kpi_message(record.row)
            try:
                future = self.publisher.publish(
                    self.topic_path, data, ordering_key=record.site_code or "", **attributes
                )
            except PublishToPausedOrderingKeyException as exc:
                future = cf.Future()
                future.set_exception(exc)
            sent.append((record, future))
        cf.wait([future for _, future in sent], timeout=self.timeout)
        return self._outcome(sent)

    def _outcome(self, sent: list[tuple[Record, Any]]) -> WriteResult:
        result = WriteResult()
        failed_sites: set[str] = set()
        ok_sites: set[str] = set()
        for record, future in sent:
            site = record.site_code or ""
            if not future.done():
                self._unsettled.setdefault(site, []).append((record.id, future))
                result.retry.append(record.id)
                result.error = "Pub/Sub did not confirm in time (the client keeps retrying)"
                continue
            exc = future.exception()
            if exc is None:
                result.done.append(record.id)
                self._attempts.pop(record.id, None)
                ok_sites.add(site)
            elif isinstance(exc, api_exceptions.InvalidArgument) and self._alone(record, sent):
                self._refused_alone(record, exc, result)
                failed_sites.add(site)
            else:
                if isinstance(exc, api_exceptions.InvalidArgument):
                    self._isolated[site] = max(self._isolated.get(site, 0), record.id)
                if not isinstance(exc, PublishToPausedOrderingKeyException):
                    result.error = f"{type(exc).__name__}: {exc}"
                result.retry.append(record.id)
                failed_sites.add(site)
        for site in failed_sites:
            self._to_resume.add(site)
            backoff, _ = self._backoff.get(site) or (Backoff(initial=0.5, maximum=10.0), 0.0)
            self._backoff[site] = (backoff, time.monotonic() + backoff.next_delay())
        for site in ok_sites - failed_sites:
            self._backoff.pop(site, None)
        return result

    def _alone(self, record: Record, sent: list[tuple[Record, Any]]) -> bool:
        return record.site_code in self._isolated and sum(1 for r, _ in sent if r.site_code == record.site_code) == 1

    def _refused_alone(self, record: Record, exc: Exception, result: WriteResult) -> None:
        attempts = self._attempts.get(record.id, 0) + 1
        if attempts < self.deadletter_attempts:
            self._attempts[record.id] = attempts
            result.retry.append(record.id)
            result.error = f"Pub/Sub refused one reading ({attempts}/{self.deadletter_attempts}): {exc}"
            return
        self._attempts.pop(record.id, None)
        detail = f"Pub/Sub refused it {attempts} times: {exc}"
        log.error(
            "reading refused by Pub/Sub; moved to the rejects table",
            extra={"event_id": record.row.get("event_id"), "site_code": record.site_code, "detail": detail},
        )
        result.dead_letters.append((record.id, dead_letter_row(record.row, DEAD_LETTER_REASON, detail)))

    def close(self) -> None:
        self.publisher.stop()
