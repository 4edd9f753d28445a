"""HTTP endpoints for the platform and operators: liveness and readiness on PORT, which App Engine routes from
outside; Prometheus metrics on a second listener bound to 127.0.0.1 (METRICS_PORT), which no route reaches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fmi_bridge.metrics import Metrics
from fmi_bridge.preflight import UnusableError, describe

log = logging.getLogger(__name__)

Check = Callable[[], str | None]  # None when healthy, else the reason


REQUEST_TIMEOUT_SECONDS = 5.0  # a client that sends nothing, or too slowly, is cut off after this


class HealthServer:
    """A thread per connection, each with a socket timeout: an idle or slow client never delays another probe
    (App Engine restarts an instance after a few failed liveness probes). The checks read the spool only on
    connections of their own, so the short-lived threads leave nothing open."""

    def __init__(self, setting: str, port: int, *, host: str, metrics: Metrics | None = None) -> None:
        """Binds at once (UnusableError naming `setting` when the port is taken): before the spool is opened or
        the broker reached. Answers from start(checks) on."""
        checks: dict[str, Check] = {}
        self._checks = checks

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_SECONDS

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics" and metrics is not None:
                    self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path in checks:
                    try:
                        problem = checks[path]()
                    except Exception as exc:  # a failing check is an unhealthy answer, not a dead server
                        problem = f"check failed: {exc}"
                    self._answer(503 if problem else 200, (problem or "ok").encode() + b"\n", "text/plain")
                else:
                    self._answer(404, b"not found\n", "text/plain")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
                pass  # probes every few seconds would drown the useful lines

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise UnusableError(describe(setting, host, port, exc)) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self, checks: dict[str, Check]) -> None:
        self._checks.update(checks)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
