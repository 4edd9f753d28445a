"""The bounded hand-off between the MQTT link's thread and the intake.

The link keeps reading the socket whatever the inbox holds, so the session's keepalive is always answered.
QoS 1 messages are always taken: the broker sends at most MQTT_RECEIVE_MAXIMUM of them un-acknowledged
(MQTT 5's Receive Maximum), and each is at most Mosquitto's max_packet_size. A QoS 0 message that finds the
inbox at its bound is dropped and counted: QoS 0 is at most once by contract. The bound counts every byte an
entry holds (topic, payload and the entry itself), not only the payload.
"""

from __future__ import annotations

import sys
import threading
from collections import deque

from fmi_bridge.readings import Inbound

MAX_MESSAGES = 10_000
MAX_BYTES = 32 * 1024**2
ENTRY_BYTES = 300  # an Inbound and its receive time, beside the topic and payload objects


def held_bytes(message: Inbound) -> int:
    return sys.getsizeof(message.topic) + sys.getsizeof(message.payload) + ENTRY_BYTES


class Inbox:
    def __init__(
        self,
        *,
        max_messages: int = MAX_MESSAGES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[Inbound] = deque()
        self._bytes = 0
        self._ready = threading.Condition()

    def has_room(self) -> bool:
        return len(self._items) < self.max_messages and self._bytes < self.max_bytes

    def put(self, message: Inbound) -> bool:
        """Take the message; False (dropped) for a QoS 0 message when the inbox is at its bound."""
        with self._ready:
            if message.qos == 0 and not self.has_room():
                return False
            self._items.append(message)
            self._bytes += held_bytes(message)
            self._ready.notify()
        return True

    def take(self, limit: int, timeout: float) -> list[Inbound]:
        """Up to `limit` messages in arrival order; waits up to `timeout` for the first."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            group = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._bytes -= sum(held_bytes(message) for message in group)
        return group

    def drop_earlier(self, generation: int) -> int:
        """Drop the QoS 1 messages of connections before `generation` that intake has not taken: the session
        resumed, so the broker sends them again. Without this, each reconnect while intake is held would add up
        to Receive Maximum more. Returns how many were dropped."""
        with self._ready:
            kept = deque(m for m in self._items if m.qos == 0 or m.generation >= generation)
            dropped = len(self._items) - len(kept)
            if dropped:
                self._items = kept
                self._bytes = sum(held_bytes(message) for message in kept)
        return dropped

    def __len__(self) -> int:
        return len(self._items)
