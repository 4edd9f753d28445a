"""BigQuery sink through the Storage Write API: one committed write stream per lane (table) and bridge
instance, and **exactly once**: every record gets its offset in the stream in the spool transaction that
chooses the batch, before the append. A resend (after a crash, a timeout, a lost answer) carries the same
offsets, and the stream answers ALREADY_EXISTS for what it already holds: no row is ever written twice.

Rules, per lane (what a refusal means: fmi_bridge/sinks/bigquery_write_errors.py, the StorageError detail first):
- OK: the batch is in the table; settled.
- ALREADY_EXISTS: a send of this batch landed before. Whole, as a rule; but if a power cut took back the
  offsets' assignment and the batch grew, only its first part: the stream's end is found within the batch and
  the rest written there, so the batch is settled only once every row of it is in the stream.
- Per-row errors (`row_errors`): the stream took none of the batch. The refused rows are dead-lettered (a
  refused reading goes to the rejects table, reason `bigquery_rejected`; a refused reject is logged and let
  go), and the rest get offsets again from the batch's first one.
- The stream gone, expired or finalized (StorageError STREAM_NOT_FOUND, STREAM_FINALIZED, INVALID_STREAM_STATE,
  …; without a detail NOT_FOUND, FAILED_PRECONDITION), or ending before the lane's first unsettled offset
  (OFFSET_OUT_OF_RANGE, OUT_OF_RANGE): what the round confirmed is settled first; then, in the next round, the
  records still holding offsets are looked up in the table by id (fmi_bridge/sinks/bigquery_landed.py), those
  found are settled in the same spool transaction that records a new stream, and the rest get offsets on it.
  (The client's OffsetOutOfRange: "specify the offset corresponding to the current end of stream"; the service
  does not say where that end is, and none of the lane's unsettled records lie at or past it, so a new stream
  from offset 0 is that cure.) A lookup that fails is asked again after a backoff; nothing is sent meanwhile.
- A stream unused for BIGQUERY_STREAM_MAX_IDLE_SECONDS is replaced before the next batch gets offsets, so it is
  never met expired; with no append unsettled at that moment, the change writes nothing twice.
- What waiting cannot cure (a table that lacks the rows' columns or is missing, a grant, an append refused whole):
  one ERROR line naming it and what to do, once per change; then, like anything else (UNAVAILABLE, deadlines),
  the batch is retried with backoff.
Streams are reused across restarts (their names are in the spool), so CreateWriteStream's quota is not spent
on every start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fmi_bridge.events import dead_letter_row
from fmi_bridge.sinks.bigquery_append_connection import AppendConnection
from fmi_bridge.sinks.bigquery_insert_all import DEAD_LETTER_REASON, REQUEST_BYTES, Destination
from fmi_bridge.sinks.bigquery_landed import LandedRows
from fmi_bridge.sinks.bigquery_write_errors import Meaning, Refusal
from fmi_bridge.sinks.contract import BIGQUERY, Sink, SinkUnavailableError, TakeBack, WriteResult, missing
from fmi_bridge.spool import READING, Record, Spool, SpoolError

log = logging.getLogger(__name__)

OK = 0
# "A committed stream has a TTL of four days if there is no traffic on the stream" (Write API, streaming into
# committed streams): replaced a day before that, when the lane next has something to send.
STREAM_MAX_IDLE_SECONDS = 3 * 86_400
USE_SAVED_SECONDS = 60.0
# Refusals waiting cannot cure: logged once per change as an ERROR saying what to do; the append is retried with
# backoff meanwhile, so the lane goes on by itself once the cause is fixed.
PROVISION = "run `python mqtt_subscriber.py provision`: it creates the table and adds missing columns"
OPERATOR_ACTIONS = {
    Meaning.SCHEMA: PROVISION,
    Meaning.TABLE_MISSING: PROVISION,
    Meaning.DENIED: "grant the bridge's service account roles/bigquery.dataEditor on the dataset (docs/deploy.md)",
    Meaning.REFUSED: "the error says why; a table changed by hand: compare it with schemas/ and run provision",
}
LOOKUP_DENIED = (
    "grant the bridge's service account roles/bigquery.jobUser on the project: after a lost write stream it "
    "queries the table for the records that were in flight (docs/deploy.md)"
)
# Rows of one append: the Write API's request limit is 10 MB ("AppendRows request size", BigQuery quotas; the
# client's docstring says 20 MB), less room for the stream name, the writer schema and framing.
APPEND_ROW_BYTES = REQUEST_BYTES - 64 * 1024
_FieldType = descriptor_pb2.FieldDescriptorProto
PROTO_TYPES = {
    "STRING": _FieldType.TYPE_STRING,
    "FLOAT64": _FieldType.TYPE_DOUBLE,
    "FLOAT": _FieldType.TYPE_DOUBLE,
    "INT64": _FieldType.TYPE_INT64,
    "INTEGER": _FieldType.TYPE_INT64,
    "BOOL": _FieldType.TYPE_BOOL,
    "BOOLEAN": _FieldType.TYPE_BOOL,
    "TIMESTAMP": _FieldType.TYPE_INT64,  # microseconds since the epoch, as the Write API takes it
}


class RowEncoder:
    """Protobuf rows for one table, from its shipped schema file (schemas/*.json)."""

    def __init__(self, schema_file: Path) -> None:
        fields = json.loads(schema_file.read_text())["schema"]["fields"]
        file = descriptor_pb2.FileDescriptorProto(name=f"{schema_file.stem}.proto", package="fmi_bridge")
        self.descriptor = file.message_type.add(name="Row")
        for number, field in enumerate(fields, 1):
            self.descriptor.field.add(
                name=field["name"], number=number, type=PROTO_TYPES[field["type"]], label=_FieldType.LABEL_OPTIONAL
            )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        self._message = message_factory.GetMessageClass(pool.FindMessageTypeByName("fmi_bridge.Row"))
        self._timestamps = {field["name"] for field in fields if field["type"] == "TIMESTAMP"}
        self._names = [field["name"] for field in fields]

    def encode(self, row: dict[str, Any]) -> bytes:
        values = {}
        for name in self._names:
            value = row.get(name)
            if value is None:
                continue
            values[name] = micros(value) if name in self._timestamps else value
        return bytes(self._message(**values).SerializeToString())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(text: str) -> int:
    """Microseconds since the epoch, as the Write API's TIMESTAMP takes them: integer arithmetic, exact over
    BigQuery's whole range (timestamp() is a float: it put a pre-1970 fraction a second late, and rounded
    9999-12-31T23:59:59.999999 past the range)."""
    delta = datetime.fromisoformat(text.replace("Z", "+00:00")) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def stream_key(instance: str, table: str) -> str:
    """A lane's key for its stream in the spool: one stream per bridge instance and table."""
    return f"{instance}:{table}"


class StorageWriteSink(Sink):
    name = "bigquery"
    bit = BIGQUERY

    def __init__(
        self,
        client: Any,
        destination: Destination,
        encoder: RowEncoder,
        landed_rows: LandedRows,
        *,
        instance: str,
        batch_size: int,
        timeout: float,
        max_idle_seconds: float = STREAM_MAX_IDLE_SECONDS,
        in_flight: int = 4,
    ) -> None:
        self.client = client  # google.cloud.bigquery_storage_v1.BigQueryWriteClient
        self.destination = destination
        self.encoder = encoder
        self.landed_rows = landed_rows
        self.lane = f"{self.name}/{destination.lane}"
        self._stream_key = stream_key(instance, destination.table)
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_idle_seconds = max_idle_seconds
        self.in_flight = in_flight  # appends sent before the first answer is awaited
        project, dataset, table = destination.table.split(".")
        self._parent = f"projects/{project}/datasets/{dataset}/tables/{table}"
        self._stream: str | None = None
        self._used_at: float | None = None  # wall-clock time of the last append that landed (it spans restarts)
        self._used_saved: float | None = None
        self._reported: str | None = None  # the operator's refusal last logged, so it is logged once per change
        self._spool: Spool | None = None  # the spool of the round in progress
        self._lost: str | None = None  # why the stream is to be replaced, once what was confirmed is settled
        self._connection = AppendConnection(client, timeout)

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit, self.destination.kind)

    def next_batch(self, spool: Spool) -> list[Record]:
        self._spool = spool
        if self._stream is None:
            if not self.owed(spool):
                return []  # a stream is opened only for something to send: CreateWriteStream has a quota
            known = spool.write_stream(self._stream_key)
            if known is None:
                self._new_stream(spool, "first use")
            else:
                self._stream, self._used_at = known
        if self._lost is not None:
            self._replace_lost_stream(spool, self._lost)
        if self._idle_too_long() and self.owed(spool) and not spool.offsets_given(self.bit, self.destination.kind):
            # Before it can expire, only for something to send (CreateWriteStream's quota), and only with no
            # append unsettled: the change cannot write a row twice.
            self._new_stream(spool, f"unused for more than {self.max_idle_seconds:g} s")
        return spool.offset_batch(
            self._stream_key,
            self.bit,
            self.destination.kind,
            self.batch_size * self.in_flight,
            (REQUEST_BYTES - 100 * self.batch_size) * self.in_flight,
        )

    def _idle_too_long(self) -> bool:
        return self._used_at is not None and time.time() - self._used_at > self.max_idle_seconds

    def _replace_lost_stream(self, spool: Spool, why: str) -> None:
        """The records that were in flight on the lost stream: those the table holds are settled with the new
        stream's start, the rest get offsets on it. Raises (and sends nothing) while the table cannot say."""
        in_flight = spool.given_records(self.bit, self.destination.kind)
        try:
            landed = self.landed_rows.landed(in_flight) if in_flight else []
        except Exception as exc:  # any failure: the records keep their offsets; asked again after a backoff
            denied = isinstance(exc, api_exceptions.Forbidden)
            action = LOOKUP_DENIED if denied else "it is asked again after a backoff"
            if denied:
                self._report("BigQuery refuses the lookup of a lost write stream's records", str(exc), action)
            raise SinkUnavailableError(
                f"cannot learn which of {len(in_flight)} records the lost write stream had landed "
                f"({type(exc).__name__}: {str(exc)[:200]}); they wait in the spool: {action}",
                code="PERMISSION_DENIED" if denied else "LOOKUP",
            ) from exc
        self._new_stream(spool, why, landed)
        self._lost = None
        if in_flight:
            log.warning(
                "records in flight on the lost stream looked up in the table",
                extra={"lane": self.lane, "landed": len(landed), "written_again": len(in_flight) - len(landed)},
            )

    def _new_stream(self, spool: Spool, why: str, landed: Sequence[int] = ()) -> None:
        try:
            stream = self.client.create_write_stream(
                parent=self._parent,
                write_stream=types.WriteStream(type_=types.WriteStream.Type.COMMITTED),
                retry=None,  # the sender retries, with backoff; the client's default would retry for minutes
                timeout=self.timeout,
            ).name
        except api_exceptions.NotFound as exc:
            raise missing(f"BigQuery table {self.destination.table}") from exc
        self._connection.close()  # a connection is opened for one stream: the next append opens one for the new
        now = time.time()
        spool.start_write_stream(self._stream_key, stream, self.bit, self.destination.kind, now, landed=landed)
        self._stream, self._used_at, self._used_saved = str(stream), now, now
        log.info("opened a BigQuery write stream", extra={"lane": self.lane, "stream": stream, "why": why})

    def write(self, records: list[Record]) -> WriteResult:
        assert self._stream is not None and self._spool is not None and records[0].offset is not None
        try:
            return self._landed(self._send(records, probe=True))
        except Exception as exc:  # transient, or an operator's to fix: same records, same offsets, later
            return self._unanswered(records, exc)

    def _unanswered(self, records: list[Record], exc: BaseException) -> WriteResult:
        """The records stay in the spool with their offsets and are sent again after a backoff."""
        error = f"append to {self._stream} failed: {type(exc).__name__}: {exc}"[:400]
        return WriteResult(retry=[record.id for record in records], error=error)

    def _send(self, records: list[Record], *, probe: bool) -> WriteResult:
        """The records as appends of at most `batch_size` rows and REQUEST_BYTES, all in flight on the open
        connection at once. Answers are taken in order: an append is settled only when every earlier one is,
        and from the first that is not taken on, the rest are handled together (they never landed, or they
        are found out by their offsets)."""
        chunks = self._chunks(records)
        answers = self._connection.exchange([request for request, _ in chunks])
        result, start = WriteResult(), 0
        for (_, size), answer in zip(chunks, answers, strict=True):
            outcome = _outcome(answer)
            if outcome is None:
                result.done += [record.id for record in records[start : start + size]]
                start += size
                continue
            rest = records[start:]
            if isinstance(outcome, BaseException):
                later = self._unanswered(rest, outcome)
            elif not isinstance(outcome, Refusal):
                later = self._refused_rows(rest, outcome.row_errors)
            elif outcome.meaning is Meaning.WRITTEN and probe:
                self.progressed(result)  # settled now: the probes that follow can take many round trips
                result = WriteResult()
                later = self._settle_what_landed(rest)
            else:
                later = self._after_refusal([record.id for record in rest], outcome)
            later.done += result.done
            return later
        return result

    def _chunks(self, records: list[Record]) -> list[tuple[Any, int]]:
        """(AppendRowsRequest, how many records it holds), in offset order."""
        chunks: list[tuple[Any, int]] = []
        rows: list[bytes] = []
        size, first = 0, records[0].offset
        for record in records:
            row = self.encoder.encode(record.row)
            if rows and (len(rows) == self.batch_size or size + len(row) > APPEND_ROW_BYTES):
                chunks.append((self._request(rows, first), len(rows)))
                rows, size, first = [], 0, record.offset
            rows.append(row)
            size += len(row) + 3  # a row's tag and length in ProtoRows
        chunks.append((self._request(rows, first), len(rows)))
        return chunks

    def _request(self, rows: list[bytes], offset: int | None) -> Any:
        return types.AppendRowsRequest(
            # Stream and schema on every request: the emulator needs them; for the service they are needed on a
            # connection's first request and allowed, unchanged, on the others (AppendRowsRequest docstring).
            write_stream=self._stream,
            offset=offset,
            proto_rows=types.AppendRowsRequest.ProtoData(
                writer_schema=types.ProtoSchema(proto_descriptor=self.encoder.descriptor),
                rows=types.ProtoRows(serialized_rows=rows),
            ),
        )

    def _settle_what_landed(self, records: list[Record]) -> WriteResult:
        """ALREADY_EXISTS at the records' first offset: a send of them landed before, whole or (if a power cut
        took the offsets' assignment back and the batch grew) only a first part. The Write API best practices
        call ALREADY_EXISTS safe to ignore for the rows it covers, not for the rest. The stream's end is found by
        appending single records at offsets within them (ALREADY_EXISTS: the end lies beyond; OUT_OF_RANGE:
        before; taken: there), the records before it are settled and the rest sent on from it."""
        first = records[0].offset
        assert first is not None
        low, high, probe = 1, len(records) - 1, len(records) - 1  # the common case first: all had landed
        taken, settled = False, 0  # records[:settled] are reported landed (to the sender, which settles them)
        while low <= high:
            [answer] = self._connection.exchange(
                [self._request([self.encoder.encode(records[probe].row)], first + probe)]
            )
            outcome = _outcome(answer)
            if outcome is None:  # the end was there: that record is written now, the rest follow it
                low, taken = probe, True
                break
            if isinstance(outcome, BaseException):
                raise outcome  # write() keeps every record with its offset, for the next round
            if isinstance(outcome, Refusal) and outcome.meaning is Meaning.WRITTEN:
                low = probe + 1
                # Each probe is a round trip: what it proved landed is settled at once, and the sender's heartbeat
                # refreshed, so a slow service neither stalls liveness nor makes a restart probe it again.
                self.progressed(WriteResult(done=[record.id for record in records[settled:low]]))
                settled = low
            elif not isinstance(outcome, Refusal) or outcome.meaning is Meaning.BEYOND_END:
                high = probe - 1  # a refused row was not written either: the end is at most there
            else:
                return self._after_refusal([record.id for record in records[settled:]], outcome)
            self.progressed(WriteResult())
            probe = (low + high) // 2
        # The stream ended at records[low] before the probes; a probe that was taken wrote that one.
        rest = records[low + taken :]
        if low < len(records):
            log.warning(
                "an earlier send had landed only part of a batch; the rest is written now",
                extra={"lane": self.lane, "stream": self._stream, "landed": low, "written": len(records) - low},
            )
        result = self._send(rest, probe=False) if rest else WriteResult()
        result.done += [record.id for record in records[settled : len(records) - len(rest)]]
        return result

    def _landed(self, result: WriteResult) -> WriteResult:
        """Notes the stream's use when something landed on it: its time to live counts from traffic."""
        if not result.done and not result.dead_letters:
            return result
        self._used_at = now = time.time()
        if self._spool is not None and (self._used_saved is None or now - self._used_saved > USE_SAVED_SECONDS):
            try:
                self._spool.write_stream_used(self._stream_key, now)  # a write a minute at most: no precision needed
                self._used_saved = now
            except SpoolError:  # e.g. a full disk: the settle that follows says so; the rows did land
                pass
        return result

    def _after_refusal(self, ids: list[int], refusal: Refusal) -> WriteResult:
        assert self._spool is not None
        meaning = refusal.meaning
        error = f"append to {self._stream}: {refusal.describe()}"[:400]
        if meaning in (Meaning.STREAM_GONE, Meaning.BEYOND_END):
            log.warning(
                "BigQuery write stream lost; opening a new one",
                extra={"lane": self.lane, "stream": self._stream, "error": refusal.describe()[:300]},
            )
            # Not here: the round's confirmed records are settled first, then the next round looks up the rest.
            self._lost = meaning.value
            self._connection.close()
        elif meaning in OPERATOR_ACTIONS:
            self._report(
                f"BigQuery refuses every append: {meaning.value}", refusal.describe(), OPERATOR_ACTIONS[meaning]
            )
        return WriteResult(retry=ids, error=error)

    def _report(self, message: str, said: str, action: str) -> None:
        """A refusal only an operator can cure: one ERROR line saying what to do, once per change."""
        if said == self._reported:
            return
        self._reported = said
        log.error(
            message,
            extra={
                "lane": self.lane,
                "table": self.destination.table,
                "error": said[:300],
                "action": action,
            },
        )

    def _refused_rows(self, records: list[Record], row_errors: Any) -> WriteResult:
        refused = {error.index: error.message for error in row_errors}
        result = WriteResult()
        for index, record in enumerate(records):
            if index not in refused:
                result.retry.append(record.id)
            elif record.kind == READING:
                detail = f"refused by the Storage Write API: {refused[index]}"
                log.error("reading refused by BigQuery; moved to the rejects table", extra={"detail": detail})
                result.dead_letters.append((record.id, dead_letter_row(record.row, DEAD_LETTER_REASON, detail)))
            else:
                log.error(
                    "rejects-table row refused by BigQuery; kept only in this log line", extra={"row": record.row}
                )
                # (retrying it could never succeed)
                result.done.append(record.id)
        # The stream took none of the batch: the rest are given offsets again from where the batch began, in the
        # transaction that settles the others.
        assert records[0].offset is not None
        result.take_back = TakeBack(self._stream_key, result.retry, records[0].offset)
        result.error = f"{len(refused)} rows refused; the rest are sent again"
        return result

    def close(self) -> None:
        self._connection.close()
        self.client.transport.close()


def _outcome(answer: Any) -> Refusal | BaseException | Any | None:
    """None when the stream took the append; a Refusal; the response refusing rows (`row_errors`); or the
    exception that left it unanswered."""
    if isinstance(answer, api_exceptions.GoogleAPICallError) and answer.grpc_status_code is not None:
        return Refusal.of(answer.grpc_status_code.value[0], str(answer.message), answer.details)
    if isinstance(answer, BaseException) or answer.row_errors:
        return answer
    if "error" in answer and answer.error.code != OK:
        return Refusal.of(answer.error.code, answer.error.message, answer.error.details)
    return None
