"""A gRPC proxy in front of bqemulator's Storage Write API that refuses chosen rows the way BigQuery does:
an AppendRows answer with `row_errors` (and an INVALID_ARGUMENT status), the stream taking none of the batch.
bqemulator itself never answers with row errors. Everything else is passed through, bytes as they are.

A row of table `table` is refused while its serialized protobuf contains `refuse` (bytes), e.g. a sensor_id
chosen for it; other tables (the rejects table, which holds the refused reading's payload) are left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from google.cloud.bigquery_storage_v1 import types
from google.rpc import code_pb2, status_pb2

SERVICE = "google.cloud.bigquery.storage.v1.BigQueryWrite"
UNARY_METHODS = ("CreateWriteStream", "GetWriteStream", "FinalizeWriteStream", "BatchCommitWriteStreams", "FlushRows")
_Request = types.AppendRowsRequest.pb()
_Response = types.AppendRowsResponse.pb()


def _same(data: bytes) -> bytes:
    return data


class WriteApiProxy:
    def __init__(self, upstream: str, table: str, refuse: bytes) -> None:
        self.table = f"/tables/{table}/"
        self.refuse = refuse
        self.refused_appends = 0
        self.passed_appends = 0
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)]
        )
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(self._unary(name), _same, _same) for name in UNARY_METHODS
        }
        handlers["AppendRows"] = grpc.stream_stream_rpc_method_handler(self._append_rows, _same, _same)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.host = f"127.0.0.1:{self.port}"

    def _unary(self, name: str) -> Any:
        forward = self._upstream.unary_unary(f"/{SERVICE}/{name}", _same, _same)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return bytes(forward(request, metadata=context.invocation_metadata()))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
                raise  # unreachable: abort raises

        return handle

    def _append_rows(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        forward = self._upstream.stream_stream(f"/{SERVICE}/AppendRows", _same, _same)
        for raw in requests:
            request = _Request.FromString(raw)
            rows = request.proto_rows.rows.serialized_rows if self.table in request.write_stream else []
            refused = [i for i, row in enumerate(rows) if self.refuse in row]
            if refused:
                with self._lock:
                    self.refused_appends += 1
                yield _Response(
                    error=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="Errors found in rows"),
                    row_errors=[
                        types.RowError.pb()(index=i, code=1, message=f"row {i}: field value refused") for i in refused
                    ],
                ).SerializeToString()
                continue
            with self._lock:
                self.passed_appends += 1
            # One upstream call per request: the bridge sends one append a call, with its schema and stream.
            try:
                yield from (bytes(answer) for answer in forward(iter([raw]), metadata=context.invocation_metadata()))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

    def start(self) -> WriteApiProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._upstream.close()
