"""Logs that a peer can make us write: at most one line per key and period, so a client
retrying in a loop (refused by a limit, penalized for a flood) cannot flood the log; the
line that is written says how many were held back."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

PERIOD = 10.0
MAX_KEYS = 4096  # the oldest key is forgotten past this: bounded memory under any attack


class Quieter:
    def __init__(
        self,
        period: float = PERIOD,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.period, self.clock, self.max_keys = period, clock, max_keys
        self._last: dict[Hashable, tuple[float, int]] = {}  # key: (last line, held back since)

    def allow(self, key: Hashable) -> int | None:
        """None: hold this line back. Else write it: the number held back since the last."""
        now = self.clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.period:
            self._last[key] = (seen[0], seen[1] + 1)
            return None
        self._last.pop(key, None)
        if len(self._last) >= self.max_keys:
            del self._last[next(iter(self._last))]
        self._last[key] = (now, 0)
        return seen[1] if seen is not None else 0

    @staticmethod
    def suffix(held: int) -> str:
        return f" ({held} more like it held back)" if held else ""
