"""Structured logs: one JSON object per line on stdout, with the keys Cloud Logging reads."""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from fmi_bridge.json_text import log_line

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": "WARNING" if record.levelname == "WARN" else record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        entry.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return log_line(entry)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("google", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class RateLimiter:
    """At most `per_second` events per key on average (bursts up to `burst`); says how many it held back.

    Keeps a flood of bad messages from filling the disk with log lines; the counts stay in the metrics.
    """

    def __init__(self, per_second: float = 5.0, burst: int = 20) -> None:
        self.per_second = per_second
        self.burst = burst
        self._tokens: dict[str, float] = {}
        self._stamp: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        """(may log now, how many were held back since the last allowed one)."""
        now = time.monotonic()
        with self._lock:
            tokens = min(
                self.burst, self._tokens.get(key, self.burst) + (now - self._stamp.get(key, now)) * self.per_second
            )
            self._stamp[key] = now
            if tokens < 1:
                self._tokens[key] = tokens
                self._held[key] = self._held.get(key, 0) + 1
                return False, 0
            self._tokens[key] = tokens - 1
            return True, self._held.pop(key, 0)
