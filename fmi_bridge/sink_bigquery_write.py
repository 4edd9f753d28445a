"""BigQuery sink through the Storage Write API: one committed write stream per lane (table) and bridge
instance, and **exactly once**: every record gets its offset in the stream in the spool transaction that
chooses the batch, before the append. A resend (after a crash, a timeout, a lost answer) carries the same
offsets, and the stream answers ALREADY_EXISTS for what it already holds: no row is ever written twice.

Rules, per lane:
- OK or ALREADY_EXISTS: the batch is in the table; settled.
- Per-row errors (`row_errors`): the stream took none of the batch. The refused rows are dead-lettered (a
  refused reading goes to the rejects table, reason `bigquery_rejected`; a refused reject is logged and let
  go), and the rest get offsets again from the batch's first one.
- The stream gone, finalized, or ahead of us (NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE): a new stream is
  created and the batch is given offsets on it. Only here can a row be written twice: a batch that landed on a
  stream that is then lost is sent once more.
- Anything else (UNAVAILABLE, deadlines, INVALID_ARGUMENT for a whole append such as a schema mismatch, a
  missing table or grant): the batch stays in the spool with its offsets and is sent again after a backoff.
Streams are reused across restarts (their names are in the spool), so CreateWriteStream's quota is not spent
on every start.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fmi_bridge.events import dead_letter_row
from fmi_bridge.sink_bigquery import DEAD_LETTER_REASON, REQUEST_BYTES, Destination
from fmi_bridge.sinks import BIGQUERY, WriteResult, missing
from fmi_bridge.spool import READING, Record, Spool

log = logging.getLogger(__name__)

OK, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE = 0, 5, 6, 9, 11
STREAM_LOST = (NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE)
_STREAM_LOST_ERRORS = (api_exceptions.NotFound, api_exceptions.FailedPrecondition, api_exceptions.OutOfRange)
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


class StorageWriteSink:
    name = "bigquery"
    bit = BIGQUERY

    def __init__(
        self,
        client: Any,
        destination: Destination,
        encoder: RowEncoder,
        *,
        instance: str,
        batch_size: int,
        timeout: float,
    ) -> None:
        self.client = client  # google.cloud.bigquery_storage_v1.BigQueryWriteClient
        self.destination = destination
        self.encoder = encoder
        self.lane = f"{self.name}/{destination.lane}"
        self._stream_key = f"{instance}:{destination.table}"  # one stream per bridge instance and table
        self.batch_size = batch_size
        self.timeout = timeout
        project, dataset, table = destination.table.split(".")
        self._parent = f"projects/{project}/datasets/{dataset}/tables/{table}"
        self._stream: str | None = None
        self._spool: Spool | None = None  # the spool of the round in progress

    def owed(self, spool: Spool) -> int:
        return spool.count_pending(self.bit, self.destination.kind)

    def next_batch(self, spool: Spool) -> list[Record]:
        self._spool = spool
        if self._stream is None:
            if not self.owed(spool):
                return []  # a stream is opened only for something to send: CreateWriteStream has a quota
            self._stream = spool.write_stream(self._stream_key) or self._new_stream(spool)
        return spool.offset_batch(
            self._stream_key, self.bit, self.destination.kind, self.batch_size, REQUEST_BYTES - 100 * self.batch_size
        )

    def _new_stream(self, spool: Spool) -> str:
        try:
            stream = self.client.create_write_stream(
                parent=self._parent,
                write_stream=types.WriteStream(type_=types.WriteStream.Type.COMMITTED),
                retry=None,  # the sender retries, with backoff; the client's default would retry for minutes
                timeout=self.timeout,
            ).name
        except api_exceptions.NotFound as exc:
            raise missing(f"BigQuery table {self.destination.table}") from exc
        spool.start_write_stream(self._stream_key, stream, self.bit, self.destination.kind)
        log.info("opened a BigQuery write stream", extra={"lane": self.lane, "stream": stream})
        return str(stream)

    def write(self, records: list[Record]) -> WriteResult:
        assert self._stream is not None and self._spool is not None and records[0].offset is not None
        request = types.AppendRowsRequest(
            write_stream=self._stream,  # on every request: the emulator, like a new connection, needs it
            offset=records[0].offset,
            proto_rows=types.AppendRowsRequest.ProtoData(
                writer_schema=types.ProtoSchema(proto_descriptor=self.encoder.descriptor),
                rows=types.ProtoRows(serialized_rows=[self.encoder.encode(record.row) for record in records]),
            ),
        )
        ids = [record.id for record in records]
        try:
            response = self._append(request)
        except _STREAM_LOST_ERRORS as exc:  # the service may answer with a status instead of an error response
            code, message = exc.grpc_status_code.value[0] if exc.grpc_status_code else NOT_FOUND, str(exc)
        except Exception as exc:  # transient, or an operator's to fix: same batch, same offsets, later
            return WriteResult(retry=ids, error=f"append to {self._stream} failed: {type(exc).__name__}: {exc}"[:400])
        else:
            code, message = (response.error.code, response.error.message) if "error" in response else (OK, "")
            if code in (OK, ALREADY_EXISTS) and not response.row_errors:
                return WriteResult(done=ids)
            if response.row_errors:
                return self._refused_rows(records, response.row_errors)
        if code in STREAM_LOST:
            log.warning(
                "BigQuery write stream lost; opening a new one",
                extra={"lane": self.lane, "stream": self._stream, "error": message[:300]},
            )
            self._stream = self._new_stream(self._spool)
        return WriteResult(retry=ids, error=f"append to {self._stream}: {code} {message}"[:400])

    def _append(self, request: Any) -> Any:
        """One append on a call of its own, closed once its answer is in: an open call holds a server worker."""
        call = self.client.append_rows(iter([request]), retry=None, timeout=self.timeout)
        try:
            return next(iter(call))
        finally:
            call.cancel()

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
        # The stream took none of the batch: the rest are given offsets again from where the batch began.
        assert records[0].offset is not None and self._spool is not None
        self._spool.take_back_offsets(self._stream_key, result.retry, records[0].offset)
        result.error = f"{len(refused)} rows refused; the rest are sent again"
        return result

    def close(self) -> None:
        self.client.transport.close()
