"""Pub/Sub sink: KPI events in spool order per site (ordering key = site_code), by Publish RPCs.

Sites are hashed onto PUBSUB_LANES lanes; each lane is a sink of its own with its own sender thread, so a slow
or failing lane never holds up another, and exactly one Publish request of a lane is in flight at a time: a
site's messages reach Pub/Sub in spool order. One request carries up to PUBSUB_BATCH_SIZE (at most 1,000)
messages under 10 MB, of mixed sites (the API allows mixed ordering keys in one request).

Rules, per lane:
- A transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, …, or the request's own deadline) leaves the
  batch in the spool; it is sent again from its first record after a jittered backoff. Duplicates are possible
  (a request that landed but whose answer was lost); a reordering of first deliveries is not.
- INVALID_ARGUMENT on a request narrows it down by halving, in order. A record refused alone holds its lane
  (nothing after it is sent) until it was refused PUBSUB_DEADLETTER_ATTEMPTS times; then it goes to the rejects
  table (reason `pubsub_rejected`) and the lane moves on.
- NOT_FOUND (topic) and PERMISSION_DENIED would fail every record alike: retried with backoff until an operator
  fixes them.
"""

from __future__ import annotations

import logging
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.pubsub_v1 import types

from fmi_bridge.events import dead_letter_row, kpi_message
from fmi_bridge.sinks import PUBSUB, WriteResult, missing
from fmi_bridge.spool import Record, Spool

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "pubsub_rejected"
MAX_MESSAGES = 1000  # Pub/Sub's limit per Publish request
REQUEST_BYTES = 9_000_000  # of record bytes: under the 10 MB request limit with the attributes and framing
_Message = types.PubsubMessage.pb()
_Request = types.PublishRequest.pb()


class PubSubSink:
    name = "pubsub"
    bit = PUBSUB

    def __init__(
        self,
        client: Any,
        topic_path: str,
        *,
        lane: int,
        lanes: int,
        batch_size: int,
        deadletter_attempts: int,
        timeout: float,
    ) -> None:
        self.client = client  # google.pubsub_v1.PublisherClient: the RPCs themselves, no client-side batching
        self.topic_path = topic_path
        self.lane_number = lane
        self.lane = f"{self.name}/{lane}" if lanes > 1 else self.name
        self.batch_size = min(batch_size, MAX_MESSAGES)
        self.deadletter_attempts = deadletter_attempts
        self.timeout = timeout
        self._attempts: dict[int, int] = {}  # record id -> times refused when sent alone

    def next_batch(self, spool: Spool) -> list[Record]:
        return spool.pending(self.bit, self.batch_size, lane=self.lane_number, max_bytes=REQUEST_BYTES)

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit, lane=self.lane_number)

    def write(self, records: list[Record]) -> WriteResult:
        result = WriteResult()
        sent = self._publish(records, result)
        result.retry.extend(record.id for record in records[sent:])
        return result

    def _publish(self, records: list[Record], result: WriteResult) -> int:
        """Publish in order; return how many records (from the first) are settled, confirmed or dead-lettered."""
        try:
            self.client.publish(
                request=types.PublishRequest(_Request(topic=self.topic_path, messages=map(_message, records))),
                retry=None,  # the sender retries, with backoff, from the first unconfirmed record
                timeout=self.timeout,
            )
        except api_exceptions.InvalidArgument as exc:
            if len(records) == 1:
                return self._refused_alone(records[0], exc, result)
            half = len(records) // 2
            first = self._publish(records[:half], result)
            return first if first < half else half + self._publish(records[half:], result)
        except api_exceptions.NotFound as exc:
            raise missing(f"Pub/Sub topic {self.topic_path}") from exc
        except Exception as exc:  # transient, or an operator's to fix: the whole request waits in the spool
            result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            return 0
        for record in records:
            self._attempts.pop(record.id, None)
        result.done.extend(record.id for record in records)
        return len(records)

    def _refused_alone(self, record: Record, exc: Exception, result: WriteResult) -> int:
        attempts = self._attempts.get(record.id, 0) + 1
        if attempts < self.deadletter_attempts:
            self._attempts[record.id] = attempts
            result.error = f"Pub/Sub refused one reading ({attempts}/{self.deadletter_attempts}): {exc}"
            return 0  # the lane waits: nothing after it may overtake it
        self._attempts.pop(record.id, None)
        detail = f"Pub/Sub refused it {attempts} times: {exc}"
        log.error(
            "reading refused by Pub/Sub; moved to the rejects table",
            extra={"event_id": record.row.get("event_id"), "site_code": record.site_code, "detail": detail},
        )
        result.dead_letters.append((record.id, dead_letter_row(record.row, DEAD_LETTER_REASON, detail)))
        return 1

    def close(self) -> None:
        self.client.transport.close()


def _message(record: Record) -> Any:
    data, attributes = kpi_message(record.row)
    return _Message(data=data, ordering_key=record.site_code or "", attributes=attributes)
