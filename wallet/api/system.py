"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get

from wallet.api.auth import context_of
from wallet.errors import ErrorCode, WalletError


class Health(msgspec.Struct, frozen=True):
    status: str
    node_id: str
    province_code: str


class SystemController(Controller):
    path = "/"
    tags = ["system"]

    @get("/health", operation_id="health")
    async def health(self, request: Request[Any, Any, Any]) -> Health:
        """Liveness: the process answers."""
        ctx = context_of(request)
        return Health(status="ok", node_id=ctx.node_id, province_code=ctx.province_code)

    @get("/ready", operation_id="ready")
    async def ready(self, request: Request[Any, Any, Any]) -> Health:
        """Readiness: the database answers."""
        ctx = context_of(request)
        try:
            await ctx.pool.fetchval("SELECT 1")
        except Exception as exc:  # any database failure means "not ready"
            raise WalletError(ErrorCode.SERVICE_UNAVAILABLE, "the database is unavailable") from exc
        return Health(status="ready", node_id=ctx.node_id, province_code=ctx.province_code)
