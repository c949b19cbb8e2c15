"""The operator surface for operations: grants in doubt, their manual resolution, the audit
trail. The same functions as the console (`plt-node grants in-doubt|resolve`, `audit list`);
the operator's name (`X-Operator-Name`) is the actor and the request id is audited."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody

from wallet import audit
from wallet.api.auth import OperatorCaller, provide_ctx, provide_operator
from wallet.api.body import StrictBody
from wallet.api.problems import request_id_of
from wallet.audit import AuditEvent
from wallet.context import WalletContext
from wallet.plt import grants, resolution
from wallet.plt.grants import InDoubt
from wallet.plt.resolution import Resolution


class ResolutionRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`evidence`: the signed evidence file's bytes, base64 (a receipt, or A's DECISION)."""

    outcome: resolution.ResolveOutcome
    reason: Annotated[str, msgspec.Meta(min_length=resolution.REASON_CHARS_MIN, max_length=500)]
    evidence: Annotated[bytes, msgspec.Meta(max_length=resolution.EVIDENCE_BYTES_MAX)] | None = None
    side: resolution.Side | None = None


class OperatorGrantsController(Controller):
    path = "/operator/v1"
    tags = ["operator: operations"]
    dependencies = {"ctx": Provide(provide_ctx), "operator": Provide(provide_operator)}

    @get("/grants/in-doubt", operation_id="listGrantsInDoubt")
    async def in_doubt(
        self, ctx: NamedDependency[WalletContext], operator: NamedDependency[OperatorCaller]
    ) -> list[InDoubt]:
        """Grants undecided past their time, or decided but unacknowledged (both sides)."""
        return await grants.in_doubt(ctx)

    @post(
        "/grants/{transfer_id:str}/resolution",
        operation_id="resolveGrant",
        status_code=200,
        dto=StrictBody[ResolutionRequest],
        return_dto=None,
    )
    async def resolve(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        request: Request[Any, Any, Any],
        transfer_id: FromPath[str],
        data: JSONBody[ResolutionRequest],
    ) -> Resolution:
        """Resolve a grant in doubt as the protocol would; never against a signed decision.

        Refusals are `state_conflict` with a `rule` (`contradicts_signed_decision`,
        `before_deadline`, `evidence_required`, `evidence_invalid`, `no_signed_decision`);
        nothing is changed. docs/operations.md, "Grants in doubt".
        """
        return await resolution.resolve(
            ctx,
            transfer_id,
            outcome=data.outcome,
            reason=data.reason,
            actor=operator.name,
            evidence=data.evidence,
            side=data.side,
            request_id=request_id_of(request),
        )

    @get("/audit", operation_id="listAuditEvents")
    async def audit_events(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        since: FromQuery[str] = "24h",
        subject: FromQuery[str | None] = None,
        action: FromQuery[str | None] = None,
        limit: FromQuery[int] = 200,
    ) -> list[AuditEvent]:
        """The audit trail, newest first: `since` is 30m, 24h, 7d or an ISO date/time."""
        return await audit.list_events(
            ctx.pool,
            since=audit.parse_since(since, ctx.clock.now()),
            subject=subject,
            action_prefix=action,
            limit=limit,
        )
