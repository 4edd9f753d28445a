"""Jittered exponential backoff, shared by the broker connection and the senders."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next_delay(self) -> float:
        """The next wait: between half and all of the current step, so restarted peers do not retry in step."""
        delay = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self.initial
