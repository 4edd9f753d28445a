"""One AppendRows connection kept open for many appends, several in flight, answers read in order.

Google's Write API best practices: keep a connection open and write many appends on it, rather than one
connection per write; opening one costs hundreds of milliseconds against the service
(googleapis/python-bigquery-storage#284). The service closes a connection idle for 600 s (ABORTED, "Closing
the stream because it has been inactive for 600 seconds", googleapis/nodejs-bigquery-storage#427) and may end
one at any time (UNAVAILABLE); the next exchange then opens a new one. Appends carry explicit offsets, so an
append whose answer was lost with its connection is simply sent again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from google.api_core import exceptions as api_exceptions

CONNECTION_SECONDS = 86_400.0  # the installed client's own default deadline for AppendRows (transports/base.py)


class ConnectionEndedError(Exception):
    """The connection ended (or an answer did not come in time) before this append was answered."""


class AppendConnection:
    def __init__(self, client: Any, timeout: float) -> None:
        self._client = client  # google.cloud.bigquery_storage_v1.BigQueryWriteClient
        self._timeout = timeout  # for the answers of one exchange
        self._requests: queue.SimpleQueue[Any] | None = None
        self._answers: queue.SimpleQueue[Any] | None = None
        self._ended = threading.Event()
        self._call: Any = None  # the open gRPC call

    def exchange(self, requests: list[Any]) -> list[Any]:
        """Send the appends (all to one stream) back to back; return, in order, each one's AppendRowsResponse, or
        the exception that ended the connection before its answer (then it and every later one are unanswered)."""
        if self._requests is None or self._ended.is_set():
            self._open(requests[0].write_stream)
        assert self._requests is not None and self._answers is not None
        for request in requests:
            self._requests.put(request)
        deadline = time.monotonic() + self._timeout
        answers: list[Any] = []
        while len(answers) < len(requests):
            try:
                answer = self._answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                answer = ConnectionEndedError(f"no answer within {self._timeout:g} s")
            if isinstance(answer, BaseException):
                self.close()  # answers still owed would come out of order with the next exchange's
                return answers + [answer] * (len(requests) - len(answers))
            answers.append(answer)
        return answers

    def _open(self, stream: str) -> None:
        self.close()
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        ended = threading.Event()

        def outgoing() -> Iterator[Any]:
            while (request := requests.get()) is not None:
                yield request

        # The transport's own gRPC callable, not the client's wrapper: the wrapper waits for the first answer as
        # it opens the call, before any append is queued, and a call not yet made cannot be cancelled. The
        # routing header names the stream, as the client's AppendRowsStream (writer.py) sends it.
        call = self._client.transport.append_rows(
            outgoing(),
            timeout=CONNECTION_SECONDS,
            metadata=(("x-goog-request-params", f"write_stream={stream}"),),
        )

        def incoming() -> None:
            try:
                for answer in call:
                    answers.put(answer)
                answers.put(ConnectionEndedError("the service ended the connection"))
            except grpc.RpcError as exc:  # the connection's end (ABORTED when idle, UNAVAILABLE, cancelled)
                answers.put(api_exceptions.from_grpc_error(exc))  # type: ignore[no-untyped-call]
            except Exception as exc:  # thread boundary: whatever it is, the waiting exchange gets it
                answers.put(exc)
            finally:
                ended.set()

        threading.Thread(target=incoming, name="bigquery-append-answers", daemon=True).start()
        self._requests, self._answers, self._ended, self._call = requests, answers, ended, call

    def close(self) -> None:
        if self._requests is None:
            return
        self._requests.put(None)  # ends the request stream
        self._call.cancel()
        self._requests = None
