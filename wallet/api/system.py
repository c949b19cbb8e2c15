"""Liveness, readiness and metrics (docs/operations.md, "Health and metrics").

/health   the process answers (no database, no peers): for a liveness probe
/ready    the database answers (else 503); each peer's reachability in the body, and
          `status: degraded` while one is unreachable (still 200: the node serves its
          own province, messages for the peer wait in the outbox)
/metrics  Prometheus text format; `Authorization: Bearer` the metrics token (setting
          `metrics_token`) or the operator token
"""

from __future__ import annotations

import hmac
import time
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from wallet import metrics, readiness
from wallet.api.auth import context_of
from wallet.errors import ErrorCode, WalletError
from wallet.readiness import PeerReadiness


class Health(msgspec.Struct, frozen=True):
    status: str
    node_id: str
    province_code: str


class Ready(msgspec.Struct, frozen=True):
    """`ready` (database and every peer answer) or `degraded` (a peer does not)."""

    status: str
    node_id: str
    province_code: str
    database: str
    peers: list[PeerReadiness]


def _may_scrape(request: Request[Any, Any, Any]) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    for expected in (
        getattr(request.app.state, "metrics_token", ""),
        getattr(request.app.state, "operator_token", ""),
    ):
        if expected and hmac.compare_digest(token.encode(), str(expected).encode()):
            return True
    return False


class SystemController(Controller):
    path = "/"
    tags = ["system"]

    @get("/health", operation_id="health")
    async def health(self, request: Request[Any, Any, Any]) -> Health:
        """Liveness: the process answers."""
        ctx = context_of(request)
        return Health(status="ok", node_id=ctx.node_id, province_code=ctx.province_code)

    @get("/ready", operation_id="ready")
    async def ready(self, request: Request[Any, Any, Any]) -> Ready:
        """Readiness: the database answers (else 503); peers' reachability is reported."""
        ctx = context_of(request)
        try:
            await ctx.pool.fetchval("SELECT 1")
        except Exception as exc:  # any database failure means "not ready"
            raise WalletError(ErrorCode.SERVICE_UNAVAILABLE, "the database is unavailable") from exc
        peers = await readiness.peers(ctx)
        status = "ready" if all(p.reachable for p in peers) else "degraded"
        return Ready(
            status=status,
            node_id=ctx.node_id,
            province_code=ctx.province_code,
            database="ok",
            peers=peers,
        )

    @get("/metrics", operation_id="metrics", media_type=metrics.MEDIA_TYPE)
    async def scrape(self, request: Request[Any, Any, Any]) -> Response[str]:
        """Prometheus metrics of this node (per process counters, database gauges)."""
        if not _may_scrape(request):
            raise WalletError(
                ErrorCode.UNAUTHORIZED, "send `Authorization: Bearer <metrics or operator token>`"
            )
        ctx = context_of(request)
        peers = ctx.plt.directory.nodes if ctx.plt is not None else []
        families = [*metrics.pool_gauges(ctx.pool), *await metrics.database_gauges(ctx, peers)]
        return Response(metrics.render(families), media_type=metrics.MEDIA_TYPE)


def metrics_middleware(app: ASGIApp) -> ASGIApp:
    """Count every routed HTTP request by route template, method and status, and time it."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        status = [500]
        started = time.perf_counter()

        async def send_and_see(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, send_and_see)
        finally:
            metrics.observe_request(
                route=str(scope.get("path_template") or "unmatched"),
                method=str(scope.get("method", "")),
                status=status[0],
                seconds=time.perf_counter() - started,
            )

    return middleware
