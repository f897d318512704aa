"""Admin (15000, node localhost), metrics (15020) and readiness (15021) endpoints of the agent."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from veil.runtime.http import Request, Response
from veil.runtime.telemetry.families import Merged

LEVELS = ("debug", "info", "warning", "error")


class AdminService:
    def __init__(
        self,
        config_dump: Callable[[], dict[str, Any]],
        ready: Callable[[], str | None],
        registry: CollectorRegistry | Merged,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`refresh`: brought up to date before a dump or a scrape (an agent's workers)."""
        self._dump, self._ready, self._registry = config_dump, ready, registry
        self._refresh = refresh
        self.started = time.time()

    async def admin(self, req: Request) -> Response:
        if req.path == "/config_dump" and req.method == "GET":
            if self._refresh is not None:
                await self._refresh()
            return Response.json(200, self._dump())
        if req.path == "/logging":
            if req.method != "POST" and not req.query:
                level = logging.getLevelName(logging.getLogger("veil").getEffectiveLevel())
                return Response.json(200, {"level": level.lower()})
            level = req.query.get("level", "")
            if level not in LEVELS:
                return Response.json(400, {"error": f"level must be one of {', '.join(LEVELS)}"})
            logging.getLogger("veil").setLevel(level.upper())
            return Response.json(200, {"level": level})
        if req.path in ("/healthz/ready", "/ready"):
            return await self.readiness(req)
        return Response.json(
            404,
            {
                "error": f"no such endpoint {req.path}",
                "endpoints": ["/config_dump", "/logging?level=debug", "/healthz/ready"],
            },
        )

    async def readiness(self, req: Request) -> Response:
        if req.path != "/healthz/ready":
            return Response.text(404, "only /healthz/ready here\n")
        why_not = self._ready()
        return (
            Response.text(503, f"not ready: {why_not}\n")
            if why_not
            else Response.text(200, "ready\n")
        )

    async def metrics(self, req: Request) -> Response:
        if req.path != "/metrics":
            return Response.text(404, "only /metrics here\n")
        if self._refresh is not None:
            await self._refresh()
        return Response(
            200, generate_latest(self._registry), "text/plain; version=0.0.4; charset=utf-8"
        )
