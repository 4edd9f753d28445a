"""The sink contract: a sink takes a batch of spool records and says, per record, what became of it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fmi_bridge.spool import Record, Spool

log = logging.getLogger(__name__)

# Every reject is logged under this one message, by the intake (beside the cloud) or by the log sink (plain
# LOCAL), so one grep finds them all.
REJECT_LOG_MESSAGE = "message rejected"

# One bit per sink in the spool's `pending` column.
PUBSUB = 1
BIGQUERY = 2
LOG = 4


class SinkUnavailableError(Exception):
    """The sink cannot be used at all now (e.g. its topic or table is missing): the round waits a backoff; the
    message says what an operator can do; `code` labels the lane's failure metric."""

    def __init__(self, message: str, code: str = "NOT_FOUND") -> None:
        super().__init__(message)
        self.code = code


def missing(resource: str) -> SinkUnavailableError:
    return SinkUnavailableError(f"{resource} does not exist: `python mqtt_subscriber.py provision` creates it")


@dataclass
class WriteResult:
    """done: confirmed; dead_letters: refused for good, with the rejects-table row to keep instead;
    retry: to send again later; error and code: why something is retried, for the log and the lane's failure
    metric; seconds: the requests' durations, where the sink sends asynchronously; hold_lane: a failure makes
    the whole lane wait a backoff (False where the sink backs off per site)."""

    done: list[int] = field(default_factory=list)
    dead_letters: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    error: str | None = None
    code: str | None = None
    hold_lane: bool = True
    seconds: list[float] | None = None  # how long each answered request took, where write() does not wait
    # Stream offsets to give again (Storage Write: the stream took none of an append), settled in the same spool
    # transaction as `done` and `dead_letters`: a crash between the two would leave a gap in the offsets.
    take_back: TakeBack | None = None


@dataclass(frozen=True)
class TakeBack:
    """Records whose write-stream offsets are given again, the stream's next offset then `first`."""

    stream_key: str
    ids: list[int]
    first: int


def error_code(exc: BaseException) -> str:
    """The status of a failed call as the lane's failure metric labels it: the gRPC code's name (HTTP errors
    of the REST clients map onto the same names), else the exception's type."""
    code = getattr(exc, "grpc_status_code", None)
    if code is not None:
        return str(code.name)
    return type(exc).__name__


class Sink(Protocol):
    """What the sender relies on. Sinks subclass it, so the defaults below are theirs unless they say otherwise."""

    name: str  # the sink, as metrics label it
    lane: str  # what this sender drains: the sink, or one of its destination tables
    bit: int
    # A sink that answers asynchronously (Pub/Sub) sets its own event when an answer arrives; None: the sender
    # makes one, set when intake commits.
    wakeup: threading.Event | None = None
    # Set by the sender. A write that takes several round trips reports what each settles as it comes: the sender
    # refreshes its heartbeat and settles it at once, so a slow service cannot make a working lane look stalled,
    # and a restart does not repeat what was finished.
    on_progress: Callable[[WriteResult], None] | None = None

    def progressed(self, result: WriteResult) -> None:
        if self.on_progress is not None:
            self.on_progress(result)

    @property
    def busy(self) -> bool:
        """Requests are in flight: the sender comes round to collect them even with nothing new to send."""
        return False

    @property
    def failing(self) -> bool:
        """Some of the lane backs off on its own (per site): the sender waits a little before its next round."""
        return False

    def owed(self, spool: Spool) -> int:
        """Records this lane still has to send."""
        ...

    def next_batch(self, spool: Spool) -> list[Record]: ...

    def write(self, records: list[Record]) -> WriteResult: ...

    def close(self) -> None: ...


class LogSink(Sink):
    """LOCAL without emulators: each event is logged, nothing leaves the machine."""

    name = lane = "log"
    bit = LOG

    def __init__(self, batch_size: int = 500) -> None:
        self.batch_size = batch_size

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit)

    def next_batch(self, spool: Spool) -> list[Record]:
        return spool.pending(self.bit, self.batch_size)

    def write(self, records: list[Record]) -> WriteResult:
        for record in records:
            context = {
                key: record.row.get(key)
                for key in (
                    "event_id",
                    "site_code",
                    "pi_tag",
                    "sensor_id",
                    "value",
                    "timestamp",
                    "reason",
                    "detail",
                    "mqtt_topic",
                )
            }
            message = "reading" if record.kind == "reading" else REJECT_LOG_MESSAGE
            log.info(message, extra={k: v for k, v in context.items() if v is not None})
        return WriteResult(done=[record.id for record in records])

    def close(self) -> None:
        pass
