"""The JSON text of the bridge's rows, events and log lines, each from an encoder made once.

json.dumps with any option builds a new JSONEncoder on every call (json/__init__.py: only the default options
reuse one); for a reading's row that construction cost more than the encoding itself. An encoder keeps no state
between calls, so one serves every thread.
"""

from __future__ import annotations

import json
from typing import Any

_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_LOG_LINE = json.JSONEncoder(default=str, ensure_ascii=False)  # LOCAL logs a line for every reading


def compact(value: Any) -> str:
    """json.dumps(value, separators=(",", ":"), ensure_ascii=False), without making an encoder for it."""
    return _COMPACT.encode(value)


def log_line(value: Any) -> str:
    """json.dumps(value, default=str, ensure_ascii=False): a log line, whatever objects its fields hold."""
    return _LOG_LINE.encode(value)
