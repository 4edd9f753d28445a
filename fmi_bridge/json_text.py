"""The compact JSON text of the bridge's rows and events, from one encoder made once.

json.dumps with any option builds a new JSONEncoder on every call (json/__init__.py: only the default options
reuse one); for a reading's row that construction cost more than the encoding itself. An encoder keeps no state
between calls, so one serves every thread.
"""

from __future__ import annotations

import json
from typing import Any

_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact(value: Any) -> str:
    """json.dumps(value, separators=(",", ":"), ensure_ascii=False), without making an encoder for it."""
    return _COMPACT.encode(value)
