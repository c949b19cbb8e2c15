"""App surface for relationships: the giver files, the receiver confirms or declines,
either ends, the receiver orders their givers (RULES 1-8)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from wallet import relationships
from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx
from wallet.api.body import StrictBody
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.relationships import MAX_ROW_ID, RelationshipState, RelationshipView, Role
from wallet.rules import RelationType

PaymentPassword = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]
# Printable text only: control characters (NUL above all) never reach the database.
_Text64 = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]{1,64}$")]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]{1,100}$")]
RelationshipId = Annotated[int, msgspec.Meta(ge=1, le=MAX_ROW_ID)]


class FileRelationship(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Filed by the giver: who the relative is, how related, and the evidence."""

    receiver_id_number: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    receiver_name: _Name
    relation_type: RelationType
    evidence_ref: _Text64
    payment_password: PaymentPassword | None = None
    device: DeviceSignature | None = None  # instead of the password (docs/plt-integration.md)
    # GB/T 2260 code of the receiver's province; omitted means this province.
    receiver_province: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")] | None = None


class PasswordConfirmation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    payment_password: PaymentPassword | None = None
    device: DeviceSignature | None = None  # instead of the password (docs/plt-integration.md)


class ReceiverOrder(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The receiver's givers, first to be drawn first (strategy `receiver_order`)."""

    relationship_ids: Annotated[list[RelationshipId], msgspec.Meta(max_length=100)]


class AppRelationshipsController(Controller):
    path = "/app/v1/relationships"
    tags = ["app: relationships"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @post(
        "/", operation_id="app_file_relationship", dto=StrictBody[FileRelationship], return_dto=None
    )
    async def file(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        data: JSONBody[FileRelationship],
    ) -> RelationshipView:
        """File a relationship as giver (payment password required). The receiver must be a
        close relative on this province's roster; it waits for their confirmation."""
        return await relationships.file(
            ctx,
            caller.person_id,
            receiver_id_number=data.receiver_id_number,
            receiver_name=data.receiver_name,
            relation_type=data.relation_type,
            evidence_ref=data.evidence_ref,
            payment_password=data.payment_password,
            device=data.device,
            receiver_province=data.receiver_province,
        )

    @get("/", operation_id="app_list_relationships")
    async def list_mine(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        role: FromQuery[Role | None] = None,
        # `state` is a reserved parameter name in Litestar (the app state).
        state_filter: Annotated[RelationshipState | None, QueryParameter(name="state")] = None,
    ) -> list[RelationshipView]:
        """My relationships, as giver, receiver or both, optionally in one state."""
        return await relationships.list_for_person(
            ctx, caller.person_id, role=role, state=state_filter
        )

    @post(
        "/{relationship_id:int}/confirm",
        operation_id="app_confirm_relationship",
        status_code=200,
        dto=StrictBody[PasswordConfirmation],
        return_dto=None,
    )
    async def confirm(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relationship_id: FromPath[int],
        data: JSONBody[PasswordConfirmation],
    ) -> RelationshipView:
        """Confirm, as receiver, a relationship filed for me (payment password required)."""
        return await relationships.confirm(
            ctx,
            caller.person_id,
            relationship_id,
            payment_password=data.payment_password,
            device=data.device,
        )

    @post(
        "/{relationship_id:int}/decline", operation_id="app_decline_relationship", status_code=200
    )
    async def decline(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relationship_id: FromPath[int],
    ) -> RelationshipView:
        """Decline, as receiver, a relationship filed for me."""
        return await relationships.decline(ctx, caller.person_id, relationship_id)

    @post(
        "/{relationship_id:int}/end",
        operation_id="app_end_relationship",
        status_code=200,
        dto=StrictBody[PasswordConfirmation],
        return_dto=None,
    )
    async def end(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        relationship_id: FromPath[int],
        data: JSONBody[PasswordConfirmation],
    ) -> RelationshipView:
        """End a relationship, as giver or receiver, at any time (payment password required)."""
        return await relationships.end(
            ctx,
            caller.person_id,
            relationship_id,
            payment_password=data.payment_password,
            device=data.device,
        )

    @put("/order", operation_id="app_order_givers", dto=StrictBody[ReceiverOrder], return_dto=None)
    async def order(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        data: JSONBody[ReceiverOrder],
    ) -> list[RelationshipView]:
        """Set, as receiver, the order in which my givers pay after my own account."""
        return await relationships.set_receiver_order(
            ctx, caller.person_id, list(data.relationship_ids)
        )
