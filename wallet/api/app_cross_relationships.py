"""App surface for cross-province relationships (RULES 5-8): the giver files at their own
node for a relative insured in another province; the receiver confirms or declines in
their own app at their node; either party ends it. Sensitive steps need the payment password.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx
from wallet.api.body import StrictBody
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.plt import relations
from wallet.plt.relations import CrossRelationshipView, CrossState, Side
from wallet.rules import RelationType

PaymentPassword = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]
# Printable text only: control characters (NUL above all) never reach the database or a peer.
_Evidence = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]{1,64}$")]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]{1,64}$")]


class FileCrossRelationship(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Filed by the giver: the relative's province, identity, relation and evidence."""

    # GB/T 2260 code of the province where the relative is insured (not where their ID
    # number was issued: RULES 22).
    receiver_province: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]
    receiver_id_number: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    receiver_name: _Name
    relation_type: RelationType
    evidence_ref: _Evidence
    payment_password: PaymentPassword | None = None
    device: DeviceSignature | None = None  # instead of the password (docs/plt-integration.md)


class PasswordConfirmation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    payment_password: PaymentPassword | None = None
    device: DeviceSignature | None = None  # instead of the password (docs/plt-integration.md)


class AppCrossRelationshipsController(Controller):
    path = "/app/v1/cross-relationships"
    tags = ["app: cross-province relationships"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @post(
        "/",
        operation_id="app_file_cross_relationship",
        status_code=201,
        dto=StrictBody[FileCrossRelationship],
        return_dto=None,
    )
    async def file(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        data: JSONBody[FileCrossRelationship],
    ) -> CrossRelationshipView:
        """File, as giver (employee scheme, payment password), a relationship with a close
        relative insured in another province. It is `requested` until the relative confirms
        at their own node; their node may refuse it (no open wallet: 3204; not on its
        roster under that name, or not in normal status: 5105), shown in `refusal`."""
        return await relations.file(
            ctx,
            caller.person_id,
            receiver_province=data.receiver_province,
            receiver_id_number=data.receiver_id_number,
            receiver_name=data.receiver_name,
            relation_type=data.relation_type,
            evidence_ref=data.evidence_ref,
            payment_password=data.payment_password,
            device=data.device,
        )

    @get("/", operation_id="app_list_cross_relationships")
    async def list_mine(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        role: FromQuery[Side | None] = None,
        # `state` is a reserved parameter name in Litestar (the app state).
        state_filter: Annotated[CrossState | None, QueryParameter(name="state")] = None,
    ) -> list[CrossRelationshipView]:
        """My cross-province relationships, as giver, receiver or both, in filing order.
        Requests waiting for me: `?role=receiver&state=pending_confirmation`."""
        return await relations.list_for_person(ctx, caller.person_id, role=role, state=state_filter)

    @get("/{relation_id:str}", operation_id="app_get_cross_relationship")
    async def get_one(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relation_id: FromPath[str],
    ) -> CrossRelationshipView:
        """One of my cross-province relationships."""
        return await relations.get_for_person(ctx, caller.person_id, relation_id)

    @post(
        "/{relation_id:str}/confirm",
        operation_id="app_confirm_cross_relationship",
        status_code=200,
        dto=StrictBody[PasswordConfirmation],
        return_dto=None,
    )
    async def confirm(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relation_id: FromPath[str],
        data: JSONBody[PasswordConfirmation],
    ) -> CrossRelationshipView:
        """Confirm, as receiver, a relationship filed for me in another province (payment
        password). Active here at once; the giver's node applies it when the message arrives."""
        return await relations.confirm(
            ctx,
            caller.person_id,
            relation_id,
            payment_password=data.payment_password,
            device=data.device,
        )

    @post(
        "/{relation_id:str}/decline",
        operation_id="app_decline_cross_relationship",
        status_code=200,
    )
    async def decline(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relation_id: FromPath[str],
    ) -> CrossRelationshipView:
        """Decline, as receiver, a relationship filed for me in another province."""
        return await relations.decline(ctx, caller.person_id, relation_id)

    @post(
        "/{relation_id:str}/end",
        operation_id="app_end_cross_relationship",
        status_code=200,
        dto=StrictBody[PasswordConfirmation],
        return_dto=None,
    )
    async def end(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relation_id: FromPath[str],
        data: JSONBody[PasswordConfirmation],
    ) -> CrossRelationshipView:
        """End, as giver or receiver, a cross-province relationship at any time (payment
        password). Unused quota goes back to the giver; nothing spent is reversed (RULES 7)."""
        return await relations.end(
            ctx,
            caller.person_id,
            relation_id,
            payment_password=data.payment_password,
            device=data.device,
        )
