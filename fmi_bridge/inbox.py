"""The bounded hand-off between the MQTT link's thread and the intake.

The link reads from the socket only while `has_room()`; otherwise the broker's packets wait in TCP buffers and
in the broker (backpressure), whatever their QoS. So memory here is bounded by count and bytes, plus at most
one packet read past the bound.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from fmi_bridge.readings import Inbound

MAX_MESSAGES = 10_000
MAX_BYTES = 32 * 1024**2


class Inbox:
    def __init__(
        self,
        *,
        max_messages: int = MAX_MESSAGES,
        max_bytes: int = MAX_BYTES,
        on_room: Callable[[], None] = lambda: None,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.on_room = on_room  # called when a take makes room after the inbox was full (wakes the reader)
        self._items: deque[Inbound] = deque()
        self._bytes = 0
        self._ready = threading.Condition()

    def has_room(self) -> bool:
        return len(self._items) < self.max_messages and self._bytes < self.max_bytes

    def put(self, message: Inbound) -> None:
        with self._ready:
            self._items.append(message)
            self._bytes += len(message.payload)
            self._ready.notify()

    def take(self, limit: int, timeout: float) -> list[Inbound]:
        """Up to `limit` messages in arrival order; waits up to `timeout` for the first."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            was_full = not self.has_room()
            group = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._bytes -= sum(len(message.payload) for message in group)
        if group and was_full:
            self.on_room()
        return group

    def __len__(self) -> int:
        return len(self._items)
