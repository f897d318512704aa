"""The I/O driver of a request's plan (`waypoint.pipeline.plan`): traffic-policy limits, the
request body, tries against backends with retries and timeouts, mirrors, the response.

Every decision is already in the `Plan`; what is decided here is only what depends on the
network as it happens (which try answered, whether a breaker is full, an outlier ejected).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import h11
import trio

from veil.core import extauthz
from veil.core.extauthz import Allowed, CheckRequest, Denied, ExtAuthzProvider
from veil.core.routes import BackendRef
from veil.core.state import MeshState, Service, Workload
from veil.core.traffic import KIND, TrafficPolicy
from veil.runtime import guard
from veil.runtime.hbone.io import HboneError, Stream
from veil.runtime.identity.tls import PeerIdentityError
from veil.waypoint import http1
from veil.waypoint.http2 import H2Exchange
from veil.waypoint.messages import (
    HttpError,
    Writer,
    copy_body,
    next_event,
    read_body,
    redirect,
    relay,
    send,
)
from veil.waypoint.pipeline import Check, Destination, Plan, Redirect, pick_endpoint
from veil.waypoint.resilience import Limits
from veil.waypoint.telemetry import RequestMetrics, RequestRecord
from veil.waypoint.upstreams import Upstream, Upstreams

log = logging.getLogger("veil.waypoint")
REPLAY_LIMIT = 64 * 1024  # bodies up to this size are kept for retries and mirrors
DIAL_ERRORS = (HboneError, OSError, ssl.SSLError, trio.TooSlowError, PeerIdentityError)


class TryFailed(Exception):
    """One try at a backend failed before a response head (retryable like a 503)."""

    def __init__(self, why: str, status: int = 503, flags: str = "UF") -> None:
        super().__init__(why)
        self.status, self.flags = status, flags


@dataclass
class Request:
    """One request in flight: where it came from, and its record."""

    down: Any  # the client's h11.Connection or H2Exchange
    stream: Stream
    dest: Destination
    rec: RequestRecord
    client_ip: str


def switched(plan: Plan, answer: Any) -> bool:
    """A 101 to a WebSocket upgrade the plan passed on."""
    return (
        plan.websocket
        and isinstance(answer, h11.InformationalResponse)
        and (answer.status_code == 101)
    )


def response_headers(plan: Plan, answer: Any) -> list[tuple[str, str]]:
    """A backend's answer's headers as the client gets them: end-to-end only, then the
    rule's and the backendRef's ResponseHeaderModifiers."""
    out = http1.end_to_end([(n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers])
    for modifier in plan.response_headers:
        out = modifier.apply(out)
    return out


def service_key(service: Service | None) -> str:
    return f"{service.namespace}/{service.name}" if service else ""


class Forwarder:
    """Executes plans; owns nothing but borrows the waypoint's upstreams, limits and metrics."""

    def __init__(  # noqa: PLR0917
        self,
        state: Callable[[], MeshState],
        upstreams: Upstreams,
        limits: Limits,
        metrics: RequestMetrics,
        rng: random.Random,
        nursery: trio.Nursery,
    ) -> None:
        self.state, self.upstreams, self.limits = state, upstreams, limits
        self.metrics, self.rng, self.nursery = metrics, rng, nursery

    async def apply_limits(self, policies: tuple[TrafficPolicy, ...]) -> None:
        """Rate limits (429) and faults (a delay, an abort), the route's policy first."""
        for policy in policies:
            if not self.limits.admit(policy, time.monotonic()):
                raise HttpError(429, "RL", f"rate limited by {KIND} {policy.key}")
            if policy.fault is not None:
                wait, abort = policy.fault.decide(self.rng)
                if wait:
                    await trio.sleep(wait)
                if abort is not None:
                    raise HttpError(abort, "FI", f"fault injected by {KIND} {policy.key}")

    async def redirect(self, r: Redirect, req: Request) -> None:
        await self.apply_limits(r.limits)
        await redirect(req.down, req.stream, r.status, r.location)
        req.rec.response_code = r.status

    async def forward(self, plan: Plan, req: Request) -> None:
        """Send the request upstream, trying again as the plan's retry policy says, until a
        backend answers or the request's timeout passes; then relay the response."""
        await self.apply_limits(plan.limits)
        rec = req.rec
        rec.traceparent = plan.traceparent
        length = plan.replayable_length
        body = None  # None: streamed as it comes, so neither retried nor mirrored
        if length is not None and length <= REPLAY_LIMIT:
            body = await read_body(req.down, req.stream)
            req.rec.request_bytes = len(body)
            for ref in plan.mirrors:
                self._mirror(ref, plan, body, req.client_ip)
        resp: tuple[Upstream, Any] | None = None
        sending = trio.CancelScope()  # a streamed body sent to HTTP/2 while the answer comes
        # timeouts.request covers the whole exchange, the response's body included
        try:
            with trio.move_on_after(plan.timeout) as deadline:
                attempt = 0
                while resp is None:
                    attempt += 1
                    w, port = self._pick(plan, req)
                    status: int | None = None
                    failure: TryFailed | None = None
                    try:
                        up, answer = await self._try(w, port, plan, body, req, sending)
                        status = answer.status_code
                    except TryFailed as e:
                        up, answer, failure = None, None, e
                    self.limits.record(plan.policy, f"{w.ip}:{port}", status, time.monotonic())
                    if up is not None and not (
                        body is not None and plan.retry.retries(attempt, status)
                    ):
                        resp = (up, answer)
                        break
                    if up is not None:  # a retryable answer: read it away, try again
                        await self.upstreams.discard(up)
                    if body is None or not plan.retry.retries(attempt, status):
                        assert failure is not None
                        raise HttpError(
                            failure.status, failure.flags, f"upstream {rec.upstream}: {failure}"
                        )
                    rec.retries += 1
                    await trio.sleep(plan.retry.delay(attempt, self.rng))
                if not switched(plan, resp[1]):
                    await self._respond(plan, req, *resp)
        finally:  # whatever the outcome, what still sends its body stops with it
            sending.cancel()
        if deadline.cancelled_caught:
            what = "no response" if resp is None else "the response not complete"
            raise HttpError(504, "UT", f"{what} within {plan.timeout:g}s (timeouts.request)")
        if resp is not None and switched(plan, resp[1]):  # lives past timeouts.request
            await self._switch(plan, req, *resp)

    def _pick(self, plan: Plan, req: Request) -> tuple[Workload, int]:
        dest, rec = req.dest, req.rec
        if plan.backend is None:
            if dest.workload is None:
                raise HttpError(503, "UH", f"no ready endpoint for {dest.authority}")
            return dest.workload, dest.port
        detector = self.limits.outliers(plan.policy) if plan.policy is not None else None
        now = time.monotonic()
        hit = pick_endpoint(
            self.state(),
            plan.backend,
            plan.port,
            self.rng,
            (lambda e: detector.ejected(e, now)) if detector is not None else None,
        )
        if hit is None:
            b = plan.backend
            raise HttpError(503, "UH", f"no ready endpoint for {b.namespace}/{b.name}")
        w, target_port = hit
        rec.destination_workload = w.owner or w.name
        rec.destination_namespace = w.namespace
        rec.destination_principal = str(w.identity(self.upstreams.trust_domain))
        rec.upstream = f"{w.ip}:{target_port}"
        return w, target_port

    async def _try(  # noqa: PLR0917
        self,
        w: Workload,
        port: int,
        plan: Plan,
        body: bytes | None,
        req: Request,
        sending: trio.CancelScope,
    ) -> tuple[Upstream, Any]:
        """Send the request to one pod and wait for its response head. A streamed body from
        an HTTP/2 client to an HTTP/2 backend is sent by a task of its own (under `sending`)
        while the answer comes: a gRPC stream's messages go both ways at once. (An HTTP/1.1
        client's connection is read by one task only: its body goes first.)"""
        svc = service_key(req.dest.service)
        breaker = self.upstreams.breaker(svc, plan.policy)
        if not breaker.admit():
            raise HttpError(503, "UO", f"circuit breaker open for {w.key} (max requests)")
        try:
            if not self.upstreams.has_idle(svc, w, port, plan.http2) and not breaker.may_connect():
                raise HttpError(503, "UO", f"circuit breaker open for {w.key} (max connections)")
            try:
                breaker.pending += 1
                up = await self.upstreams.acquire(
                    w, port, req.client_ip, plan.traceparent, svc, plan.http2
                )
            except DIAL_ERRORS as e:
                raise TryFailed(f"connect: {e}") from None
            finally:
                breaker.pending -= 1
            out = list(plan.headers)
            if body is not None:
                out = [(n, v) for n, v in out if n.lower() != "content-length"]
                out.append(("content-length", str(len(body))))
            limit = plan.backend_timeout
            try:
                w_up = Writer(up.conn, up.stream)
                await w_up.send(h11.Request(method=plan.method, target=plan.target, headers=out))
                if body is not None:
                    if body:
                        await w_up.send(h11.Data(data=body))
                    await w_up.send(h11.EndOfMessage())
                elif plan.http2 and isinstance(req.down, H2Exchange):  # HTTP/2 both sides
                    self.nursery.start_soon(self._send_body, req, w_up, up, sending)
                else:
                    req.rec.request_bytes += await copy_body(
                        req.down, req.stream, w_up, "the client went away"
                    )
                with trio.fail_after(limit):
                    answer = await next_event(up.conn, up.stream)
                    while isinstance(answer, h11.InformationalResponse) and not switched(
                        plan, answer
                    ):
                        answer = await next_event(up.conn, up.stream)
            except trio.TooSlowError:
                self.upstreams.drop(up)
                raise TryFailed(
                    f"no response within {limit:g}s (timeouts.backendRequest)", 504, "UT"
                ) from None
            except (h11.ProtocolError, HboneError) as e:
                self.upstreams.drop(up)
                raise TryFailed(str(e)) from None
            if not isinstance(answer, h11.Response) and not switched(plan, answer):
                self.upstreams.drop(up)
                raise TryFailed("closed without a response")
            return up, answer
        finally:
            breaker.done()

    async def _send_body(
        self, req: Request, out: Writer, up: Upstream, scope: trio.CancelScope
    ) -> None:
        """The client's streamed body to the backend, as it comes. If the client goes away
        (or the backend does), the backend's stream is reset: its answer then fails too."""
        with scope:
            try:
                req.rec.request_bytes += await copy_body(
                    req.down, req.stream, out, "the client went away"
                )
            except (HttpError, HboneError, h11.ProtocolError) as e:
                log.debug("request body to %s: %s", req.rec.upstream, e)
                up.stream.reset()
            except Exception:  # a bug: this request fails, never the waypoint's nursery
                guard.caught("waypoint_request_body")
                up.stream.reset()

    async def _respond(self, plan: Plan, req: Request, up: Upstream, resp: Any) -> None:
        rec = req.rec
        rheaders = response_headers(plan, resp)
        try:
            out = Writer(req.down, req.stream)
            await out.send(
                h11.Response(status_code=resp.status_code, headers=rheaders, reason=resp.reason)
            )
            rec.response_code = resp.status_code
            rec.response_bytes += await copy_body(
                up.conn, up.stream, out, f"upstream {rec.upstream} ended mid-response", 502, "UC"
            )
        except (h11.ProtocolError, HboneError) as e:
            self.upstreams.drop(up)
            raise HttpError(502, "UPE", f"upstream {rec.upstream}: {e}") from None
        except BaseException:
            self.upstreams.drop(up)
            raise
        self.upstreams.release(up)

    async def _switch(self, plan: Plan, req: Request, up: Upstream, answer: Any) -> None:
        """The backend accepted the WebSocket (101): the client gets the 101, then the bytes
        of both sides are relayed as they come until both ends close. Authorization, routing
        and the upgrade itself were judged on the request; the frames are the app's."""
        rec = req.rec
        rheaders = response_headers(plan, answer)
        try:
            head = h11.InformationalResponse(
                status_code=101, headers=[*rheaders, *http1.UPGRADE_HEADERS]
            )
            await send(req.down, req.stream, head)
            rec.response_code = 101
            if early := up.conn.trailing_data[0]:  # the backend spoke right after its 101
                await req.stream.send(early)
                rec.response_bytes += len(early)
            if early := req.down.trailing_data[0]:
                await up.stream.send(early)
                rec.request_bytes += len(early)
            async with trio.open_nursery() as nursery:

                async def down_to_up() -> None:
                    rec.request_bytes += await relay(req.stream, up.stream)

                async def up_to_down() -> None:
                    rec.response_bytes += await relay(up.stream, req.stream)

                nursery.start_soon(down_to_up)
                nursery.start_soon(up_to_down)
        except (h11.ProtocolError, HboneError) as e:
            raise HttpError(502, "UPE", f"upstream {rec.upstream}: {e}") from None
        finally:
            self.upstreams.drop(up)  # never reused: it speaks WebSocket now

    async def ask_providers(self, check: Check, req: Request) -> tuple[Allowed, ...] | Denied:
        """Each CUSTOM policy's provider in turn; the first that denies decides."""
        allowed = []
        for ref, provider, request in check.checks:
            verdict = await self._ask(provider, request, req.client_ip)
            if isinstance(verdict, Denied):
                return replace(verdict, why=f"{ref}: {verdict.why}")
            allowed.append(verdict)
        return tuple(allowed)

    async def _ask(
        self, provider: ExtAuthzProvider, request: CheckRequest, client_ip: str
    ) -> Allowed | Denied:
        """One check over HTTP/1.1 to a pod of the provider's Service, through HBONE (its
        identity verified like any backend's); within the provider's timeout, or it counts as
        unreachable (statusOnError, unless it fails open)."""
        state = self.state()
        svc = state.service(provider.namespace, provider.service)
        hit = pick_endpoint(state, svc, provider.port, self.rng) if svc is not None else None
        if svc is None or hit is None:
            where = f"{provider.namespace}/{provider.service}:{provider.port}"
            return extauthz.unreachable(provider, f"no ready endpoint for {where}")
        w, port = hit
        up: Upstream | None = None
        headers = request.headers
        if not any(n == "host" for n, _ in headers):
            headers = [("host", provider.address), *headers]
        try:
            with trio.fail_after(provider.timeout):
                up = await self.upstreams.acquire(w, port, client_ip, "", service_key(svc))
                ask = h11.Request(method=request.method, target=request.target, headers=headers)
                await send(up.conn, up.stream, ask)
                await send(up.conn, up.stream, h11.EndOfMessage())
                answer = await next_event(up.conn, up.stream)
                if not isinstance(answer, h11.Response):
                    raise TryFailed("closed without a response")
                body = bytearray()
                while not isinstance(ev := await next_event(up.conn, up.stream), h11.EndOfMessage):
                    if not isinstance(ev, h11.Data) or len(body) > extauthz.BODY_LIMIT:
                        raise TryFailed("the answer broke off or is too large")
                    body += ev.data
        except (*DIAL_ERRORS, h11.ProtocolError, TryFailed) as e:
            if up is not None:
                self.upstreams.drop(up)
            why = "no answer in time" if isinstance(e, trio.TooSlowError) else str(e)
            log.info("ext_authz provider %s: %s", provider.name, why)
            return extauthz.unreachable(provider, why or type(e).__name__)
        self.upstreams.release(up)
        fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers]
        return extauthz.verdict(provider, answer.status_code, fields, bytes(body))

    def _mirror(self, ref: BackendRef, plan: Plan, body: bytes, client_ip: str) -> None:
        """Send a copy to the mirror backend and forget the answer (never slows the original)."""
        svc = self.state().service(ref.namespace, ref.name)
        hit = pick_endpoint(self.state(), svc, ref.port, self.rng) if svc else None
        if hit is None:
            return
        w, port = hit
        headers = plan.headers

        async def shadow() -> None:
            with trio.move_on_after(10):
                try:
                    up = await self.upstreams.acquire(
                        w, port, client_ip, http1.child_traceparent(headers), http2=plan.http2
                    )
                    out = [(n, v) for n, v in headers if n.lower() != "content-length"]
                    out.append(("content-length", str(len(body))))
                    request = h11.Request(method=plan.method, target=plan.target, headers=out)
                    await send(up.conn, up.stream, request)
                    if body:
                        await send(up.conn, up.stream, h11.Data(data=body))
                    await send(up.conn, up.stream, h11.EndOfMessage())
                    answer = await next_event(up.conn, up.stream)
                    if isinstance(answer, h11.Response):
                        code = str(answer.status_code)
                        await self.upstreams.discard(up)
                    else:
                        code = "error"
                        self.upstreams.drop(up)
                except (*DIAL_ERRORS, h11.ProtocolError) as e:
                    log.debug("mirror to %s failed: %s", w.key, e)
                    code = "error"
                self.metrics.mirrored.labels(f"{ref.namespace}/{ref.name}", code).inc()

        self.nursery.start_soon(shadow)
