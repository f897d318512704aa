"""The one place a snapshot is swapped: single writer, many readers that wait for news."""

from __future__ import annotations

import trio

from veil.core.state import MeshState


class StateStore:
    """Holds the current MeshState. Only `update()` replaces it; readers never block writers."""

    def __init__(self, initial: MeshState | None = None) -> None:
        self._current = initial or MeshState()
        self._changed = trio.Event()
        self.loaded = initial is not None

    @property
    def current(self) -> MeshState:
        return self._current

    def update(self, state: MeshState) -> None:
        self._current = state
        self.loaded = True
        self._changed.set()
        self._changed = trio.Event()

    async def wait_newer(self, version: int) -> MeshState:
        """Return the first snapshot whose version is greater than `version`."""
        while self._current.version <= version:
            await self._changed.wait()
        return self._current
