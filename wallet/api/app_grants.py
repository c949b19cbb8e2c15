"""App surface for cross-province quota grants (RULES 11-16).

The giver instructs a grant and follows it; the receiver sees offered grants, accepts or
declines them, and sees their quotas. Each of these is authorised by a device signature
(`device`, the phone's registered key, `wallet.devices`) or by the payment password; exactly
one of the two. A committed grant has a receipt with both nodes' signed envelopes and both
device signatures, verifiable offline.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter

from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx
from wallet.api.body import StrictBody
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.ledger import MAX_AMOUNT_FEN
from wallet.plt import grants, quota, receipts
from wallet.plt.grants import GrantView, IncomingGrantView
from wallet.plt.quota import QuotaState, QuotaSummary

PaymentPassword = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]
Uuid = Annotated[str, msgspec.Meta(min_length=36, max_length=36)]


class GrantInstruction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A grant, as the giver's app sends it.

    `transfer_id` is a UUIDv7 the app makes and stores before the first send; a retry
    reuses it (and gets the grant's current state back).
    """

    transfer_id: Uuid
    relation_id: Uuid
    amount_fen: Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT_FEN)]
    payment_password: PaymentPassword | None = None
    # grant.instruct over {relation_id, transfer_id} and amount_fen (protocol.device_auth).
    device: DeviceSignature | None = None


class PasswordConfirmation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Accept or decline: a device signature (grant.accept / grant.decline over
    {transfer_id} and the amount, `person` = the device's `receiver`) or the password."""

    payment_password: PaymentPassword | None = None
    device: DeviceSignature | None = None


class AppGrantsController(Controller):
    path = "/app/v1"
    tags = ["app: cross-province grants"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @post(
        "/grants",
        operation_id="app_instruct_grant",
        status_code=202,
        dto=StrictBody[GrantInstruction],
        return_dto=None,
    )
    async def instruct(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        data: JSONBody[GrantInstruction],
    ) -> GrantView:
        """Grant a quota to a relative insured in another province (device signature or
        payment password).

        Accepted means the amount is frozen and offered; the receiver must accept before
        the next 06:00 or it comes back. Limits: the amount per grant, grants per day, the
        blackout hours, one pending grant per relative (refusals carry `plt_code`).
        """
        return await grants.instruct(
            ctx,
            caller.person_id,
            transfer_id=data.transfer_id,
            relation_id=data.relation_id,
            amount_fen=data.amount_fen,
            payment_password=data.payment_password,
            device=data.device,
        )

    @get("/grants", operation_id="app_list_grants")
    async def list_given(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> list[GrantView]:
        """My grants as giver, newest first."""
        return await grants.grants_of_giver(ctx, caller.person_id)

    @get("/grants/incoming", operation_id="app_list_incoming_grants")
    async def list_incoming(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> list[IncomingGrantView]:
        """Grants offered to me by relatives in other provinces, newest first."""
        return await grants.incoming_of_receiver(ctx, caller.person_id)

    @post(
        "/grants/incoming/{transfer_id:str}/accept",
        operation_id="app_accept_grant",
        status_code=200,
        dto=StrictBody[PasswordConfirmation],
        return_dto=None,
    )
    async def accept(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        transfer_id: FromPath[str],
        data: JSONBody[PasswordConfirmation],
    ) -> IncomingGrantView:
        """Accept an offered grant (payment password). Binding: it becomes a quota I can
        spend once the giver's node confirms, which it does if it hears before its deadline."""
        return await grants.accept(
            ctx,
            caller.person_id,
            transfer_id,
            payment_password=data.payment_password,
            device=data.device,
        )

    @post(
        "/grants/incoming/{transfer_id:str}/decline",
        operation_id="app_decline_grant",
        status_code=200,
        dto=StrictBody[PasswordConfirmation],
        return_dto=None,
    )
    async def decline(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        transfer_id: FromPath[str],
        data: JSONBody[PasswordConfirmation],
    ) -> IncomingGrantView:
        """Decline an offered grant (payment password); the amount goes back to the giver."""
        return await grants.decline(
            ctx,
            caller.person_id,
            transfer_id,
            payment_password=data.payment_password,
            device=data.device,
        )

    @get("/grants/{transfer_id:str}", operation_id="app_get_grant")
    async def get_grant(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        transfer_id: FromPath[str],
    ) -> GrantView:
        """One of my grants as giver."""
        return await grants.grant_of_giver(ctx, caller.person_id, transfer_id)

    @get("/grants/{transfer_id:str}/receipt", operation_id="app_get_grant_receipt")
    async def receipt(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        transfer_id: FromPath[str],
    ) -> dict[str, Any]:
        """The receipt of a committed grant: both nodes' signed envelopes (PREPARE,
        RECEIVED, ACCEPT, DECISION, ACK) and the key sets that verify them, offline."""
        return await receipts.receipt_for(ctx, caller.person_id, transfer_id)

    @get("/quotas", operation_id="app_list_quotas")
    async def quotas(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        # `state` is a reserved parameter name in Litestar (the app state).
        quota_state: Annotated[QuotaState | None, QueryParameter(name="state")] = None,
    ) -> QuotaSummary:
        """Quotas relatives in other provinces granted me: granted, used, available."""
        return await quota.quotas_of(ctx, caller.person_id, quota_state)
