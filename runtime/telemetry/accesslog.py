"""The access log: one JSON line per proxied connection (agent) or request (waypoint).

Lines keep the daemons' log format (`<time> INFO veil.access: {json}`) and stream (stderr),
so the log stays one file to read, but they do not each go through a LogRecord, a formatter
and an unbuffered write: per connection that cost ~12 % of the agent's CPU in the connection
benchmark. While a daemon runs `run()`, lines are buffered and written every
`FLUSH_INTERVAL` (or when 64 KiB wait), as Envoy buffers its file access logs; without it
(tests, tools) each line is written at once. The `veil.access` logger's level still turns
the log on and off at runtime.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import trio

FLUSH_INTERVAL = 0.1
FLUSH_SIZE = 64 * 1024


class AccessLog:
    def __init__(self, name: str = "veil.access", stream: TextIO | None = None) -> None:
        self.logger = logging.getLogger(name)
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._buffered = False  # a `run()` task flushes
        self._second = -1
        self._stamp = ""

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, entry: Mapping[str, Any]) -> None:
        """Log one entry (callers check `enabled()` first to skip building it)."""
        self.write_json(json.dumps(entry))

    def write_json(self, entry: str) -> None:
        """Log one entry already encoded as a JSON object."""
        now = time.time()
        second = int(now)
        if second != self._second:  # logging's asctime, computed once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = f"{self._stamp},{int((now - second) * 1000):03d} INFO {self.logger.name}: {entry}\n"
        self._lines.append(line)
        self._size += len(line)
        if not self._buffered or self._size >= FLUSH_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        stream = self._stream or sys.stderr
        try:
            stream.write("".join(self._lines))
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the proxy
            pass
        self._lines.clear()
        self._size = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write buffered lines every FLUSH_INTERVAL until cancelled, then the rest."""
        self._buffered = True
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self._buffered = False
            self.flush()
