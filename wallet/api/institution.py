"""Institution surface: settlements and refunds by a designated institution's API key
(RULES 17-20). Replays of an identical request answer 200 with what was stored; the first
answer is 201."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody

from wallet import refunds, settlement
from wallet.api.auth import (
    InstitutionCaller,
    provide_connection,
    provide_ctx,
    provide_institution,
)
from wallet.api.body import StrictBody
from wallet.context import WalletContext
from wallet.ledger import MAX_AMOUNT_FEN
from wallet.refunds import RefundView
from wallet.rules import SettlementCategory
from wallet.settlement import REFERENCE_PATTERN, SettlementView, SettlingInstitution

AmountFen = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT_FEN)]
Reference = Annotated[str, msgspec.Meta(pattern=REFERENCE_PATTERN)]

# msgspec names the refused field at the end of its message: "... - at `$.amount_fen`".


class SettleRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A payment: the patient's code, what it is for, and the institution's own reference."""

    payment_code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    amount_fen: AmountFen
    category: SettlementCategory
    reference: Reference
    allow_partial: bool = False


class RefundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A refund under the institution's own reference; all that is left when no amount."""

    reference: Reference
    amount_fen: AmountFen | None = None


def _settling(caller: InstitutionCaller) -> SettlingInstitution:
    return SettlingInstitution(
        institution_id=caller.institution_id,
        account_id=caller.account_id,
        categories=caller.categories,
        code=caller.code,
    )


class InstitutionSettlementsController(Controller):
    path = "/institution/v1/settlements"
    tags = ["institution: settlements"]
    # One connection per request: the key lookup and the handler share it (`conn`).
    dependencies = {
        "conn": Provide(provide_connection),
        "institution": Provide(provide_institution),
        "ctx": Provide(provide_ctx),
    }

    @post("/", operation_id="institution_settle", dto=StrictBody[SettleRequest], return_dto=None)
    async def settle(
        self,
        ctx: NamedDependency[WalletContext],
        institution: NamedDependency[InstitutionCaller],
        conn: NamedDependency[asyncpg.Connection],
        data: JSONBody[SettleRequest],
    ) -> Response[SettlementView]:
        """Charge a patient's payment code: own personal account first, then the givers in
        the province's order, in one transaction. 201 when made, 200 for a replay of the same
        request under the same reference."""
        view, created = await settlement.settle(
            ctx,
            _settling(institution),
            payment_code=data.payment_code,
            amount_fen=data.amount_fen,
            category=data.category.value,
            reference=data.reference,
            allow_partial=data.allow_partial,
            conn=conn,
        )
        return Response(view, status_code=201 if created else 200)

    @get("/{reference:str}", operation_id="institution_get_settlement")
    async def get_one(
        self,
        ctx: NamedDependency[WalletContext],
        institution: NamedDependency[InstitutionCaller],
        conn: NamedDependency[asyncpg.Connection],
        reference: FromPath[str],
    ) -> SettlementView:
        """One of this institution's settlements, with its sources and what was refunded."""
        return await settlement.get_settlement(ctx, institution.institution_id, reference, conn)

    @post(
        "/{reference:str}/refunds",
        operation_id="institution_refund_settlement",
        dto=StrictBody[RefundRequest],
        return_dto=None,
    )
    async def refund(
        self,
        ctx: NamedDependency[WalletContext],
        institution: NamedDependency[InstitutionCaller],
        conn: NamedDependency[asyncpg.Connection],
        reference: FromPath[str],
        data: JSONBody[RefundRequest],
    ) -> Response[RefundView]:
        """Refund (part of) one of this institution's settlements to the exact accounts it
        came from, last source first. 201 when made, 200 for a replay."""
        view, created = await refunds.refund(
            ctx,
            _settling(institution),
            reference,
            reference=data.reference,
            amount_fen=data.amount_fen,
            conn=conn,
        )
        return Response(view, status_code=201 if created else 200)
