"""Pub/Sub sink: KPI events in spool order per site (ordering key = site_code), by Publish RPCs.

Google's service takes one ordering key per Publish request ("All PubsubMessages published in a given
PublishRequest must specify the same ordering_key", `PubsubMessage` in google/pubsub_v1/types/pubsub.py; a
mixed request is refused with FAILED_PRECONDITION). So a request carries one site's messages, and within a lane
several sites' requests are in flight at once, one per site:

- A site's next request leaves only after its previous one was answered and settled: per-site order of first
  deliveries is spool order. A lost answer means the request is sent again: duplicates are possible, a
  reordering is not.
- A request holds up to PUBSUB_BATCH_SIZE (at most 1,000) messages and stays under 10 MB measured as sent
  (attributes, ordering key and framing included), and under the site's throughput budget: Google allows
  1 MB/s per ordering key (fmi_bridge/sinks/pubsub_limits.py).
- A failing or slow site waits alone (its own jittered backoff); the lane's other sites go on.
- INVALID_ARGUMENT narrows the request down by halving, in order. A record refused alone holds its site until
  it was refused PUBSUB_DEADLETTER_ATTEMPTS times; then it goes to the rejects table (reason
  `pubsub_rejected`) and the site moves on.
- A code that waiting cannot cure (NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, UNAUTHENTICATED,
  INVALID_ARGUMENT) is logged as an ERROR once per change, naming what an operator can do; the site is retried
  with backoff until it is fixed. RESOURCE_EXHAUSTED slows that site only (the installed client's Publish retry
  settings treat it as retryable: google/pubsub_v1/services/publisher/transports/base.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.pubsub_v1 import types

from fmi_bridge.backoff import Backoff
from fmi_bridge.events import dead_letter_row, kpi_message_of_body
from fmi_bridge.sinks import pubsub_limits as limits
from fmi_bridge.sinks.contract import PUBSUB, Sink, WriteResult, error_code
from fmi_bridge.spool import Record, Spool, lane_of

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "pubsub_rejected"
FRAMING_BYTES = 6  # a message's field tag and length prefix in the request: at most 1 + 5 bytes
# What an operator can do about a refusal that waiting cannot cure.
OPERATOR_ACTIONS = {
    "NOT_FOUND": "the topic does not exist: `python mqtt_subscriber.py provision` creates it",
    "PERMISSION_DENIED": "grant the bridge's service account roles/pubsub.publisher on the topic",
    "UNAUTHENTICATED": "check the bridge's credentials (Application Default Credentials)",
    "FAILED_PRECONDITION": "the service refused the request's form; the readings stay spooled: report it with "
    "this line",
    "INVALID_ARGUMENT": "a message breaks a Pub/Sub limit; it goes to the rejects table after "
    "PUBSUB_DEADLETTER_ATTEMPTS refusals while the topic takes other messages",
}
TOPIC_REFUSES_ACTION = (
    "the topic refuses every message, so the cause is the topic, not the readings: usually a schema on it that "
    "this release's KPI events do not match (`python mqtt_subscriber.py check-config` compares it); commit "
    "schemas/kpi_event.avsc as a revision of that schema (gcloud pubsub schemas commit), or point the topic at "
    "this release's (gcloud pubsub topics update --schema); the readings wait in the spool, in order, and go "
    "once the topic takes them"
)
_Request = types.PublishRequest.pb()


@dataclass
class _Outcome:
    """What became of one site's request."""

    done: list[int] = field(default_factory=list)
    dead_letters: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    code: str | None = None
    error: str | None = None
    seconds: float = 0.0


class TopicAcceptance:
    """When the topic last took a message, shared by every lane. A reading refused alone is its own fault only
    if the topic took other messages since it was first refused; if it took none, the refusal is the topic's
    (a schema, a setting) and every reading waits: no dead letters, order kept."""

    def __init__(self) -> None:
        self.last = 0.0
        self.refusing: str | None = None  # the service's words, while the topic refuses everything
        self._lock = threading.Lock()

    def took(self) -> None:
        self.last = time.monotonic()
        with self._lock:
            was, self.refusing = self.refusing, None
        if was is not None:
            log.info("Pub/Sub takes messages again; the readings held in the spool are being sent", extra={"was": was})

    def since(self, moment: float) -> bool:
        return self.last > moment

    def refuses(self, error: str) -> None:
        """Say it once, however many lanes and sites meet it."""
        with self._lock:
            first, self.refusing = self.refusing is None, error
        if first:
            log.error(
                "Pub/Sub refuses every message; the readings stay in the spool",
                extra={"code": "INVALID_ARGUMENT", "error": error, "action": TOPIC_REFUSES_ACTION},
            )


@dataclass
class _Site:
    """A site that failed or used up its throughput budget: when it may send again."""

    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=10.0))
    not_before: float = 0.0
    failing: bool = False


class KeyMeter:
    """Bytes published per ordering key over a sliding window: how much a key may send now."""

    def __init__(self, budget: int, window: float = limits.KEY_WINDOW_SECONDS) -> None:
        self.budget = budget
        self.window = window
        self._sent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()  # the sender asks for room, the pool's threads spend

    def room(self, key: str, now: float) -> int:
        with self._lock:
            sent = self._sent.get(key)
            while sent and sent[0][0] <= now - self.window:
                sent.popleft()
            if not sent:
                self._sent.pop(key, None)  # idle keys leave no state behind
                return self.budget
            return self.budget - sum(size for _, size in sent)

    def free_at(self, key: str) -> float:
        """When the oldest bytes of the key leave the window."""
        with self._lock:
            sent = self._sent.get(key)
            return sent[0][0] + self.window if sent else 0.0

    def spend(self, key: str, size: int) -> None:
        """Counted when the request leaves, not when it was planned: the service sees the sending time."""
        with self._lock:
            self._sent.setdefault(key, deque()).append((time.monotonic(), size))


class PubSubSink(Sink):
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
        sites_in_flight: int = 8,
        key_bytes_per_second: int = limits.KEY_BYTES_PER_SECOND,
        acceptance: TopicAcceptance | None = None,
    ) -> None:
        self.client = client  # google.pubsub_v1.PublisherClient: the RPCs themselves, no client-side batching
        self.topic_path = topic_path
        self.lane_number = lane
        self.lanes = lanes
        self.lane = f"{self.name}/{lane}" if lanes > 1 else self.name
        self.batch_size = min(batch_size, limits.MAX_MESSAGES_PER_REQUEST)
        self.deadletter_attempts = deadletter_attempts
        self.timeout = timeout
        self.sites_in_flight = sites_in_flight
        self.wakeup: threading.Event = threading.Event()  # set when a request is answered; the sender waits on it
        self._meter = KeyMeter(min(key_bytes_per_second, limits.KEY_BYTES_PER_SECOND))
        self._request_budget = limits.MAX_REQUEST_BYTES - len(topic_path.encode()) - FRAMING_BYTES
        self._pool = ThreadPoolExecutor(max_workers=sites_in_flight, thread_name_prefix=f"publish-{lane}")
        self._in_flight: dict[str, Future[_Outcome]] = {}
        self._sites: dict[str, _Site] = {}  # only sites that failed or wait for budget
        self.acceptance = acceptance or TopicAcceptance()  # one for every lane of the topic
        self._attempts: dict[int, tuple[int, float]] = {}  # record id -> (times refused alone, when first)
        self._first_refused: dict[int, float] = {}  # record id -> when a request holding it was first refused
        self._refusal: tuple[str, str] | None = None  # the last refusal logged as an ERROR

    @property
    def busy(self) -> bool:
        """Requests are in flight: the sender comes round to collect them even with nothing new to send."""
        return bool(self._in_flight)

    @property
    def failing(self) -> bool:
        return any(site.failing for site in self._sites.values())

    def next_batch(self, spool: Spool) -> list[Record]:
        """The next records of the lane's sites that may send now (none in flight, none waiting), oldest site
        first, up to one request's worth each."""
        free = self.sites_in_flight - len(self._in_flight)
        if free <= 0:
            return []
        now = time.monotonic()
        ready = sorted(
            (first, site)
            for site, first in spool.pending_sites(self.bit)
            if lane_of(site, self.lanes) == self.lane_number
            and site not in self._in_flight
            and not (site in self._sites and self._sites[site].not_before > now)
        )
        return [record for _, site in ready[:free] for record in spool.pending(self.bit, self.batch_size, site=site)]

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit, lane=self.lane_number)

    def write(self, records: list[Record]) -> WriteResult:
        """Collect the answers that came in, then send one request per site of `records` (none of them in
        flight). Never waits for an answer: the sender comes round again when one arrives."""
        seconds: list[float] = []
        result = WriteResult(hold_lane=False, seconds=seconds)
        self._collect(result, seconds)
        now = time.monotonic()
        for key, request, chosen in self._requests(records, now):
            if len(self._in_flight) >= self.sites_in_flight:
                break
            future = self._pool.submit(self._publish, key, chosen, request)
            self._in_flight[key] = future
            future.add_done_callback(lambda _: self.wakeup.set())
        return result

    def _requests(self, records: list[Record], now: float) -> Iterator[tuple[str, Any, list[Record]]]:
        """Per site, in order of first appearance: its next request and the records in it, within the request
        size and the site's throughput budget (counted on the PubsubMessages, as the quota is). The messages are
        made inside the request: made alone and then copied in, each in flight was held twice, the most of the
        bridge's memory in a backlog."""
        by_site: dict[str, list[Record]] = {}
        for record in records:
            by_site.setdefault(record.site_code or "", []).append(record)
        for key, site_records in by_site.items():
            key_room = self._meter.room(key, now)
            idle = key_room >= self._meter.budget  # nothing of the key in the window
            room = min(key_room, self._request_budget)
            request = _Request(topic=self.topic_path)
            for record in site_records[: self.batch_size]:
                size = _add_message(request, record).ByteSize() + FRAMING_BYTES
                if size > room:
                    # A message larger than the whole budget (PUBSUB_KEY_BYTES_PER_SECOND set low) goes alone once
                    # the key's window is empty, or its site would never send again; Google's own 1 MB/s a key
                    # is above any message a reading makes (a payload is at most 64 KiB).
                    if not (idle and len(request.messages) == 1 and size <= self._request_budget):
                        del request.messages[-1]
                    break
                room -= size
            if request.messages:
                yield key, request, site_records[: len(request.messages)]
            else:  # the site used its throughput budget: it waits until its oldest bytes leave the window
                self._sites.setdefault(key, _Site()).not_before = self._meter.free_at(key)

    def _collect(self, result: WriteResult, seconds: list[float]) -> None:
        for key, future in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[key]
            outcome = future.result()
            seconds.append(outcome.seconds)
            result.done += outcome.done
            result.dead_letters += outcome.dead_letters
            result.retry += outcome.retry
            if outcome.retry:
                result.code, result.error = outcome.code, f"site {key}: {outcome.error}"
                site = self._sites.setdefault(key, _Site())
                site.failing = True
                site.not_before = time.monotonic() + site.backoff.next_delay()
                self._name_refusal(outcome)
            elif outcome.done or outcome.dead_letters:
                self._sites.pop(key, None)
                if not self.failing:
                    self._refusal = None  # a refusal that comes back later is logged again

    def _name_refusal(self, outcome: _Outcome) -> None:
        action = OPERATOR_ACTIONS.get(outcome.code or "")
        if action is None or self.acceptance.refusing is not None:
            return  # transient, or the topic's refusal, which TopicAcceptance has said once
        refusal = (outcome.code or "", (outcome.error or "")[:200])
        if refusal == self._refusal:
            return
        self._refusal = refusal
        log.error(
            "Pub/Sub refused a request; the readings stay in the spool",
            extra={"sink": self.lane, "code": outcome.code, "error": outcome.error, "action": action},
        )

    def _publish(self, key: str, records: list[Record], request: Any) -> _Outcome:
        """One site's request, narrowed by halving on INVALID_ARGUMENT. Runs on the lane's pool."""
        outcome = _Outcome()
        started = time.monotonic()
        sent = self._send(key, records, request, outcome)
        outcome.retry = [record.id for record in records[sent:]]
        outcome.seconds = time.monotonic() - started
        return outcome

    def _send(self, key: str, records: list[Record], request: Any, outcome: _Outcome) -> int:
        """Publish in order; return how many records (from the first) are settled, confirmed or dead-lettered."""
        self._meter.spend(key, sum(message.ByteSize() for message in request.messages))  # a resent half again
        try:
            self.client.publish(
                # wrap: the request takes the protobuf as it is; the constructor would deep-copy every message
                # (proto-plus Message.__init__), another copy of the request in memory while it is in flight.
                request=types.PublishRequest.wrap(request),
                retry=None,  # the sink retries, with backoff, from the first unconfirmed record
                timeout=self.timeout,
            )
        except api_exceptions.InvalidArgument as exc:
            if len(records) == 1:
                return self._refused_alone(records[0], exc, outcome)
            if self.acceptance.refusing is not None:  # the topic refuses everything: halving would only crawl
                outcome.code, outcome.error = error_code(exc), f"the topic refuses every message: {exc}"
                return 0
            refused_at = time.monotonic()  # the halves the topic takes from now on are evidence it takes messages
            for record in records:
                self._first_refused.setdefault(record.id, refused_at)
            half = len(records) // 2
            first = self._send(key, records[:half], self._part(request, 0, half), outcome)
            if first < half:
                return first
            return half + self._send(key, records[half:], self._part(request, half, len(records)), outcome)
        except Exception as exc:  # transient, or an operator's to fix: the rest of the request waits
            outcome.code, outcome.error = error_code(exc), f"{type(exc).__name__}: {str(exc)[:300]}"
            return 0
        self.acceptance.took()
        for record in records:
            self._attempts.pop(record.id, None)
            self._first_refused.pop(record.id, None)
        outcome.done += [record.id for record in records]
        return len(records)

    def _refused_alone(self, record: Record, exc: Exception, outcome: _Outcome) -> int:
        attempts, first = self._attempts.get(record.id, (0, self._first_refused.get(record.id, time.monotonic())))
        attempts += 1
        outcome.code = error_code(exc)
        if attempts < self.deadletter_attempts or not self.acceptance.since(first):
            self._attempts[record.id] = (attempts, first)
            if attempts < self.deadletter_attempts:
                outcome.error = f"refused one reading ({attempts}/{self.deadletter_attempts}): {exc}"
            else:  # refused again and again while the topic took nothing else: the topic's fault
                outcome.error = f"the topic refuses every message: {exc}"
                self.acceptance.refuses(str(exc)[:300])
            return 0  # the site waits: nothing after it may overtake it
        self._attempts.pop(record.id, None)
        self._first_refused.pop(record.id, None)
        detail = f"Pub/Sub refused it {attempts} times: {exc}"
        log.error(
            "reading refused by Pub/Sub; moved to the rejects table",
            extra={"event_id": record.row.get("event_id"), "site_code": record.site_code, "detail": detail},
        )
        outcome.dead_letters.append((record.id, dead_letter_row(record.row, DEAD_LETTER_REASON, detail)))
        return 1

    def _part(self, request: Any, start: int, end: int) -> Any:
        return _Request(topic=self.topic_path, messages=request.messages[start:end])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)  # unanswered requests stay spooled
        self.client.transport.close()


def _add_message(request: Any, record: Record) -> Any:
    """The record's KPI message, added to the request."""
    data, attributes = kpi_message_of_body(record.body)
    return request.messages.add(data=data, ordering_key=record.site_code or "", attributes=attributes)
