"""An HTTP proxy in front of bqemulator that adds what the emulator cannot do: BigQuery's 10 MB request limit
on insertAll (a 400, as BigQuery answers), the partition window (rows `invalid`, with the service's words; the
others `stopped` unless skipInvalidRows), and per-row transient errors (`backendError`) for chosen rows.

Rows it fails are not passed on, so the emulator's table holds exactly what BigQuery would have kept. Every other
request is passed through unchanged.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.sinks.bigquery_write_conformance import EMULATOR_LOCK

REQUEST_LIMIT = 10 * 1024 * 1024
# The partition window: rows of a time-partitioned table are streamed only into partitions "within 1825 days in
# the past and 366 days in the future relative to the current date" (the service's refusal, quoted in
# mozilla/gcp-ingestion#2721; fmi_bridge/partition_window.py).
WINDOW_DAYS = (1825, 366)
WINDOW_MESSAGE = (
    "is outside the allowed bounds. You can only stream to partitions of date range within 1825 days in the past "
    "and 366 days in the future relative to the current date."
)


def _inside_window(value: Any) -> bool:
    if not isinstance(value, str):
        return True  # NULL goes to the __NULL__ partition
    day = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).date()
    today = datetime.now(UTC).date()
    return today - timedelta(days=WINDOW_DAYS[0]) <= day <= today + timedelta(days=WINDOW_DAYS[1])


@dataclass
class BigQueryFaults:
    flaky: Callable[[dict[str, Any]], bool] = lambda row: False  # rows to fail with backendError...
    flaky_times: int = 2  # ...this many times each
    failed: dict[str, int] = field(default_factory=dict)  # insertId -> times failed
    spoils_request: Callable[[dict[str, Any]], bool] = lambda row: False  # a row that makes the whole request 400
    latency_seconds: float = 0.0  # added to every insertAll
    entity_limit: int | None = None  # a request larger answers 413, as Google's front end may for far-oversized
    entity_refused: int = 0
    too_large: int = 0  # requests refused for their size
    window_refused: int = 0  # rows refused for the partition window
    insert_calls: int = 0
    largest_request: int = 0
    deny_queries: bool = False  # queries answered 403, as for an identity without bigquery.jobs.create
    queries: int = 0


class BigQueryProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = BigQueryFaults()
        self._partitions: dict[str, str | None] = {}  # table path -> partitioning column
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.split("?")[0].endswith("/insertAll"):
                    status, answer = proxy._insert_all(self.path, body)
                elif self.command == "POST" and self.path.split("?")[0].endswith("/queries"):
                    status, answer = proxy._query(self.path, body)
                else:
                    status, answer = proxy._forward(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay  # noqa: N815 (http.server's names)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> BigQueryProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def serve(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.upstream + path, data=body or None, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _query(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.faults.queries += 1
        if self.faults.deny_queries:
            # The service's answer to jobs.query without the permission (its reason and the permission it names).
            project = path.split("/projects/")[1].split("/", maxsplit=1)[0]
            message = f"Access Denied: Project {project}: User does not have bigquery.jobs.create permission"
            error = {"code": 403, "message": message, "status": "PERMISSION_DENIED"}
            return 403, json.dumps({"error": {**error, "errors": [{"reason": "accessDenied", **error}]}}).encode()
        with EMULATOR_LOCK:  # a query meeting an append can deadlock the emulator (one DuckDB connection)
            return self._forward("POST", path, body)

    def _partition_field(self, insert_path: str) -> str | None:
        """The table's time-partitioning column, read from the emulator (once a table)."""
        table_path = insert_path.split("?", maxsplit=1)[0].removesuffix("/insertAll")
        if table_path not in self._partitions:
            status, answer = self._forward("GET", table_path, b"")
            resource = json.loads(answer or b"{}") if status == 200 else {}
            self._partitions[table_path] = resource.get("timePartitioning", {}).get("field")
        return self._partitions[table_path]

    def _insert_all(self, path: str, body: bytes) -> tuple[int, bytes]:
        faults = self.faults
        faults.insert_calls += 1
        time.sleep(faults.latency_seconds)
        faults.largest_request = max(faults.largest_request, len(body))
        if faults.entity_limit is not None and len(body) > faults.entity_limit:
            faults.entity_refused += 1
            return 413, b"<html><title>413 Request Entity Too Large</title></html>"
        if len(body) > REQUEST_LIMIT:
            faults.too_large += 1
            error = {"code": 400, "message": f"Request payload size exceeds the limit: {REQUEST_LIMIT} bytes."}
            return 400, json.dumps({"error": {**error, "errors": [{"reason": "badRequest", **error}]}}).encode()
        request = json.loads(body)
        if any(faults.spoils_request(row["json"]) for row in request.get("rows", [])):
            error = {"code": 400, "message": "Invalid request: one row spoils it"}
            return 400, json.dumps({"error": {**error, "errors": [{"reason": "invalid", **error}]}}).encode()
        kept, errors = [], []
        partition = self._partition_field(path)
        outside = {
            index
            for index, row in enumerate(request.get("rows", []))
            if partition and not _inside_window(row["json"].get(partition))
        }
        if outside and not request.get("skipInvalidRows"):
            # The service takes none of the request: the invalid rows say why, the others are `stopped`.
            for index, _ in enumerate(request.get("rows", [])):
                reason = ("invalid", WINDOW_MESSAGE) if index in outside else ("stopped", "")
                errors.append({"index": index, "errors": [{"reason": reason[0], "message": reason[1]}]})
            faults.window_refused += len(outside)
            return 200, json.dumps({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors}).encode()
        for index, row in enumerate(request.get("rows", [])):
            insert_id = row.get("insertId", "")
            if index in outside:
                faults.window_refused += 1
                errors.append({"index": index, "errors": [{"reason": "invalid", "message": WINDOW_MESSAGE}]})
            elif faults.flaky(row["json"]) and faults.failed.get(insert_id, 0) < faults.flaky_times:
                faults.failed[insert_id] = faults.failed.get(insert_id, 0) + 1
                errors.append({"index": index, "errors": [{"reason": "backendError", "message": "try again"}]})
            else:
                kept.append((index, row))
        status, answer = self._forward("POST", path, json.dumps({**request, "rows": [r for _, r in kept]}).encode())
        if status != 200:
            return status, answer
        upstream = json.loads(answer or b"{}")
        for error in upstream.get("insertErrors", []):
            errors.append({**error, "index": kept[error["index"]][0]})
        return 200, json.dumps({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors}).encode()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the emulator's REST URL")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every insertAll")
    options = parser.parse_args()
    proxy = BigQueryProxy(options.upstream)
    proxy.faults.latency_seconds = options.latency
    print(f"BigQuery proxy on {proxy.url}", flush=True)
    proxy.serve()
