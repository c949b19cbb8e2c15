"""The operator surface for people and money: roster, statuses, monthly credits, counter
openings, and the ledger check. Every change writes an audit event."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, JSONBody

from wallet import credits, ledger, records, roster, wallets
from wallet.api.auth import OperatorCaller, provide_ctx, provide_operator
from wallet.api.body import StrictBody
from wallet.api.problems import request_id_of
from wallet.context import WalletContext
from wallet.credits import BatchResult, CreditRow
from wallet.records import WalletView
from wallet.roster import IdNumberText, ImportResult, PersonStatus, PersonView, RosterRow
from wallet.wallets import CounterOpening

# A request body is at most 4 MiB anyway; this bounds the work one request can ask for.
MAX_ROSTER_ROWS = 50_000


class RosterImport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    persons: Annotated[list[RosterRow], msgspec.Meta(min_length=1, max_length=MAX_ROSTER_ROWS)]


class StatusChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: PersonStatus


class CreditBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch_id: Annotated[str, msgspec.Meta(pattern=credits.BATCH_ID_PATTERN)]
    month: Annotated[str, msgspec.Meta(pattern=credits.MONTH_PATTERN)]
    credits: Annotated[
        list[CreditRow], msgspec.Meta(min_length=1, max_length=credits.MAX_BATCH_ROWS)
    ]


class CounterWallet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id_number: IdNumberText
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    payment_password: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    opened_via: CounterOpening = "counter"
    guardian_id_number: IdNumberText | None = None


class LedgerCheck(msgspec.Struct, frozen=True):
    balanced: bool
    accounts: int
    transfers: int
    total_debits_posted: int
    total_credits_posted: int
    total_debits_pending: int
    total_credits_pending: int
    overdrawn_accounts: list[int]
    accounts_not_matching_transfers: list[int]


class OperatorPeopleController(Controller):
    path = "/operator/v1"
    tags = ["operator: people and credits"]
    dependencies = {"ctx": Provide(provide_ctx), "operator": Provide(provide_operator)}

    @post(
        "/roster",
        operation_id="importRoster",
        status_code=200,
        dto=StrictBody[RosterImport],
        return_dto=None,
    )
    async def import_roster(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        request: Request[Any, Any, Any],
        data: JSONBody[RosterImport],
    ) -> ImportResult:
        """Create or update insured persons (the roster is authoritative).

        A bad row refuses the whole import: `roster_file_invalid` with its 1-based `line`.
        """
        return await roster.import_rows(
            ctx, data.persons, actor=operator.name, request_id=request_id_of(request)
        )

    @get("/persons/{id_number:str}", operation_id="getPerson")
    async def get_person(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        id_number: FromPath[str],
    ) -> PersonView:
        """One insured person with wallet state and personal account balance."""
        return await roster.get_person(ctx, id_number)

    @patch(
        "/persons/{id_number:str}",
        operation_id="setPersonStatus",
        dto=StrictBody[StatusChange],
        return_dto=None,
    )
    async def set_status(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        request: Request[Any, Any, Any],
        id_number: FromPath[str],
        data: JSONBody[StatusChange],
    ) -> PersonView:
        """Change an insured status; leaving `normal` ends every live relationship (RULES 6)."""
        return await roster.set_status(
            ctx, id_number, data.status, actor=operator.name, request_id=request_id_of(request)
        )

    @post(
        "/credit-batches",
        operation_id="postCreditBatch",
        status_code=201,
        responses={200: ResponseSpec(BatchResult, description="The same batch, posted before")},
        dto=StrictBody[CreditBatch],
        return_dto=None,
    )
    async def post_credit_batch(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        request: Request[Any, Any, Any],
        data: JSONBody[CreditBatch],
    ) -> Response[BatchResult]:
        """Post monthly credits from the province fund, all or nothing.

        201 when posted; 200 with the stored result when the same batch is sent again;
        409 `idempotency_conflict` when the batch id was used for other content.
        """
        result = await credits.post_batch(
            ctx,
            data.batch_id,
            data.month,
            data.credits,
            actor=operator.name,
            request_id=request_id_of(request),
        )
        return Response(result, status_code=201 if result.created else 200)

    @post(
        "/wallets",
        operation_id="openWalletAtCounter",
        status_code=201,
        dto=StrictBody[CounterWallet],
        return_dto=None,
    )
    async def open_wallet(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        request: Request[Any, Any, Any],
        data: JSONBody[CounterWallet],
    ) -> WalletView:
        """Open a wallet at a counter, for the person or through their guardian (RULES 9)."""
        person_id = await wallets.open_wallet_at_counter(
            ctx,
            data.id_number,
            data.name,
            data.payment_password,
            data.opened_via,
            data.guardian_id_number,
            actor=operator.name,
            request_id=request_id_of(request),
        )
        return await records.wallet_view(ctx, person_id)

    @get("/ledger/check", operation_id="checkLedger")
    async def check_ledger(
        self, ctx: NamedDependency[WalletContext], operator: NamedDependency[OperatorCaller]
    ) -> LedgerCheck:
        """Check the books: balanced, nothing overdrawn, balances equal their transfers."""
        async with ctx.pool.acquire() as conn:
            books = await ledger.check_books(conn)
        return LedgerCheck(balanced=books.balanced, **msgspec.structs.asdict(books))
