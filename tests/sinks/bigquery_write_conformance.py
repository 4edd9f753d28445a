"""A gRPC layer in front of bqemulator's Storage Write API that refuses what Google's BigQuery refuses, with the
service's codes and `StorageError` details; bqemulator takes all of it. Each rule says where it comes from.

- Request size: "AppendRows request size: 10 MB" (BigQuery quotas, Storage Write API limits). INVALID_ARGUMENT.
- Writer schema with fields the table lacks: StorageError SCHEMA_MISMATCH_EXTRA_FIELDS (`StorageErrorCode`
  docstring: "user schema has extra field than bigquery schema"), INVALID_ARGUMENT. bqemulator drops them.
- Stream time to live: "A committed stream has a TTL of four days if there is no traffic on the stream" (Write
  API, committed type). On the layer's clock (`stream_ttl_seconds`, short in tests) an expired stream is answered
  INVALID_ARGUMENT with StorageError STREAM_NOT_FOUND: the hardest form, where the status code says nothing
  (Apache Beam's writer reads INVALID_ARGUMENT as "stream gone", apache/beam#16906).
- The partition window: a row whose partition column lies outside the days the service streams into
  ("within 1825 days in the past and 366 days in the future relative to the current date", the service's
  words in mozilla/gcp-ingestion#2721) is a row error, and the stream takes none of the append.
- Fault injection, not a rule: a row whose serialized bytes contain `refuse` is a row error.

Appends it refuses are not passed on, so the emulator's table holds exactly what BigQuery would have kept.
`refusals` lists what it refused, by rule, for the suite to check.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.rpc import code_pb2, status_pb2

SERVICE = "google.cloud.bigquery.storage.v1.BigQueryWrite"
UNARY_METHODS = ("GetWriteStream", "FinalizeWriteStream", "BatchCommitWriteStreams", "FlushRows")
REQUEST_LIMIT = 10 * 1024 * 1024
TTL_SECONDS = 4 * 86_400
IDLE_CLOSE_SECONDS = 600.0
WINDOW_DAYS = (1825, 366)
_Request = types.AppendRowsRequest.pb()
_Response = types.AppendRowsResponse.pb()
_StorageCode = types.StorageError.StorageErrorCode
FIELDS_ERROR = 1  # RowError.RowErrorCode
# One call into bqemulator at a time, from this process: it can deadlock when a REST call (a query, a table's
# schema) meets an append (one DuckDB connection, two threads). The tests' queries take it too (support.bq_query).
# BigQuery has no such limit; the bridge's lanes still run concurrently up to the layer.
EMULATOR_LOCK = threading.RLock()


@dataclass(frozen=True)
class TableInfo:
    columns: frozenset[str]
    partition_field: str | None


def _same(data: bytes) -> bytes:
    return data


def storage_error_status(code: int, storage_code: Any, entity: str, message: str) -> status_pb2.Status:
    detail = types.StorageError.pb()(code=storage_code, entity=entity, error_message=message)
    packed = any_pb2.Any()
    packed.Pack(detail)
    return status_pb2.Status(code=code, message=message, details=[packed])


@dataclass
class WriteApiConformance:
    upstream: str
    table_info: Callable[[str], TableInfo]  # "projects/p/datasets/d/tables/t" -> the table as BigQuery has it
    stream_ttl_seconds: float = TTL_SECONDS
    window_days: tuple[int, int] = WINDOW_DAYS
    refuse: bytes | None = None  # fault injection: rows of `refuse_table` containing these bytes are refused
    refuse_table: str = "readings"
    refuse_whole: bytes | None = None  # fault injection: an append with a row containing these is refused whole
    idle_close_seconds: float = IDLE_CLOSE_SECONDS
    round_trip_seconds: float = 0.0  # latency model: each append answered no sooner than this after it was sent
    # The way back: an append is in the table this long before its answer leaves (a bridge killed meanwhile
    # leaves records that landed and were never settled).
    answer_delay_seconds: float = 0.0
    landed_unanswered: int = 0  # appends the emulator took whose answers the layer still holds (answer delay)
    connect_seconds: float = 0.0  # latency model: what opening an AppendRows connection costs
    silent: threading.Event = field(default_factory=threading.Event)  # fault: while set, appends get no answer
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (rule, detail)
    passed_appends: int = 0
    connections: int = 0  # AppendRows calls opened
    idle_closed: int = 0  # connections the layer closed for idleness

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._upstream = EMULATOR_LOCK
        self._used: dict[str, float] = {}  # stream -> last time the layer saw it made or used
        self._row_classes: dict[bytes, Any] = {}
        self._tables: dict[str, tuple[float, TableInfo]] = {}  # path -> (read at, info); under _upstream
        self._channel = grpc.insecure_channel(self.upstream)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)]
        )
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(self._unary(name), _same, _same) for name in UNARY_METHODS
        }
        handlers["CreateWriteStream"] = grpc.unary_unary_rpc_method_handler(self._create, _same, _same)
        handlers["AppendRows"] = grpc.stream_stream_rpc_method_handler(self._append_rows, _same, _same)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.host = f"127.0.0.1:{self.port}"

    def refused(self, rule: str) -> list[str]:
        with self._lock:
            return [detail for name, detail in self.refusals if name == rule]

    def _unary(self, name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        forward = self._channel.unary_unary(f"/{SERVICE}/{name}", _same, _same)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return bytes(forward(request, metadata=context.invocation_metadata()))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
                raise  # unreachable: abort raises

        return handle

    def _create(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        answer = self._unary("CreateWriteStream")(request, context)
        with self._lock:
            self._used[types.WriteStream.pb().FromString(answer).name] = time.monotonic()
        return answer

    def _append_rows(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        forward = self._channel.stream_stream(f"/{SERVICE}/AppendRows", _same, _same)
        with self._lock:
            self.connections += 1
        time.sleep(self.connect_seconds)
        arrivals: queue.SimpleQueue[tuple[bytes, float] | None] = queue.SimpleQueue()

        def receive() -> None:  # stamps each append as it comes, so appends in flight share a round trip
            with contextlib.suppress(Exception):  # the bridge cancelled the call
                for raw in requests:
                    arrivals.put((raw, time.monotonic() + self.round_trip_seconds))
            arrivals.put(None)

        threading.Thread(target=receive, daemon=True).start()
        while True:
            try:
                arrival = arrivals.get(timeout=self.idle_close_seconds)
            except queue.Empty:
                # Write API: "Closing the stream because it has been inactive for 600 seconds" (ABORTED),
                # googleapis/nodejs-bigquery-storage#427.
                with self._lock:
                    self.idle_closed += 1
                inactive = f"Closing the stream because it has been inactive for {self.idle_close_seconds:g} seconds"
                context.abort(grpc.StatusCode.ABORTED, inactive)
            if arrival is None:
                return
            raw, due = arrival
            time.sleep(max(0.0, due - time.monotonic()))
            while self.silent.is_set() and context.is_active():
                time.sleep(0.05)
            if not context.is_active():
                return
            with self._upstream:
                refusal = self._check(raw, _Request.FromString(raw))
                if refusal is None:
                    # Each append upstream on a call of its own: the bridge's connection ends here, at the layer.
                    try:
                        call = forward(iter([raw]), metadata=context.invocation_metadata())
                        answers = [bytes(answer) for answer in call]
                    except grpc.RpcError as exc:
                        context.abort(exc.code(), exc.details() or "")
            if refusal is not None:
                yield refusal.SerializeToString()
                continue
            with self._lock:
                self.passed_appends += 1
            stream = _Request.FromString(raw).write_stream
            if any(not _Response.FromString(answer).HasField("error") for answer in answers):
                with self._lock:
                    self._used[stream] = time.monotonic()
            took = not any(_Response.FromString(answer).HasField("error") for answer in answers)
            with self._lock:
                self.landed_unanswered += took
            try:
                time.sleep(self.answer_delay_seconds)
                yield from answers
            finally:
                with self._lock:
                    self.landed_unanswered -= took

    def _refuse(self, rule: str, detail: str, response: Any) -> Any:
        with self._lock:
            self.refusals.append((rule, detail))
        return response

    def _check(self, raw: bytes, request: Any) -> Any:
        stream = request.write_stream
        if len(raw) > REQUEST_LIMIT:
            message = f"AppendRows request too large: {len(raw)} bytes, limit {REQUEST_LIMIT}"
            return self._refuse("request size", message, _Response(error=_status(code_pb2.INVALID_ARGUMENT, message)))
        with self._lock:
            last = self._used.get(stream)
        if last is not None and time.monotonic() - last > self.stream_ttl_seconds:
            message = f"Stream has expired after {self.stream_ttl_seconds:g} s without traffic: {stream}"
            status = storage_error_status(code_pb2.INVALID_ARGUMENT, _StorageCode.STREAM_NOT_FOUND, stream, message)
            return self._refuse("stream time to live", message, _Response(error=status))
        table = stream.split("/streams/")[0]
        info = self._table(table)
        row_class = self._row_class(request.proto_rows.writer_schema.proto_descriptor)
        extra = sorted({f.name for f in row_class.DESCRIPTOR.fields} - info.columns)
        if extra:
            message = f"Input schema has more fields than BigQuery schema, extra fields: {', '.join(extra)}"
            status = storage_error_status(
                code_pb2.INVALID_ARGUMENT, _StorageCode.SCHEMA_MISMATCH_EXTRA_FIELDS, table, message
            )
            return self._refuse("writer schema fields", message, _Response(error=status))
        rows = request.proto_rows.rows.serialized_rows
        if self.refuse_whole is not None and any(self.refuse_whole in row for row in rows):
            message = "Invalid request: the append is refused (injected, with no detail)"
            return self._refuse("injected", message, _Response(error=_status(code_pb2.INVALID_ARGUMENT, message)))
        injected = self.refuse if table.endswith(f"/tables/{self.refuse_table}") else None
        row_errors = self._row_errors(
            request.proto_rows.rows.serialized_rows, row_class, info.partition_field, injected
        )
        if row_errors:
            status = _status(code_pb2.INVALID_ARGUMENT, "Errors found in rows")
            return _Response(error=status, row_errors=row_errors)
        return None

    def _table(self, path: str) -> TableInfo:
        """The table as BigQuery has it, read again at most every second (a schema change shows within one)."""
        known = self._tables.get(path)
        if known is None or time.monotonic() - known[0] > 1.0:
            known = (time.monotonic(), self.table_info(path))
            self._tables[path] = known
        return known[1]

    def _row_errors(self, rows: Any, row_class: Any, partition_field: str | None, refuse: bytes | None) -> list[Any]:
        errors = []
        first, last = self._window()
        for index, raw in enumerate(rows):
            if refuse is not None and refuse in raw:
                self._refuse("injected", f"row {index}", None)
                errors.append(
                    types.RowError.pb()(index=index, code=FIELDS_ERROR, message=f"row {index}: field value refused")
                )
                continue
            if partition_field is None:
                continue
            micros = getattr(row_class.FromString(raw), partition_field)
            day = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)).date()
            if not first <= day <= last:
                past, future = self.window_days
                message = (
                    f"Value {micros} for partition column {partition_field} is outside the allowed bounds. You can "
                    f"only stream to partitions of date range within {past} days in the past and {future} days in "
                    "the future relative to the current date."
                )
                self._refuse("partition window", message, None)
                errors.append(types.RowError.pb()(index=index, code=FIELDS_ERROR, message=message))
        return errors

    def _window(self) -> tuple[date, date]:
        today = datetime.now(UTC).date()
        return today - timedelta(days=self.window_days[0]), today + timedelta(days=self.window_days[1])

    def _row_class(self, descriptor: Any) -> Any:
        key = descriptor.SerializeToString()
        with self._lock:
            known = self._row_classes.get(key)
        if known is not None:
            return known
        file = descriptor_pb2.FileDescriptorProto(name="writer_schema.proto")
        file.message_type.add().CopyFrom(descriptor)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        made = message_factory.GetMessageClass(pool.FindMessageTypeByName(descriptor.name))
        with self._lock:
            self._row_classes[key] = made
        return made

    def start(self) -> WriteApiConformance:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()


def _status(code: int, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


def table_info_from(bigquery: Any) -> Callable[[str], TableInfo]:
    """The layer's view of a table, read from the emulator through the BigQuery client (`bigquery.Client`)."""

    def info(path: str) -> TableInfo:
        _, project, _, dataset, _, table = path.split("/")
        got = bigquery.get_table(f"{project}.{dataset}.{table}")
        partition = got.time_partitioning.field if got.time_partitioning else None
        return TableInfo(frozenset(column.name for column in got.schema), partition)

    return info
