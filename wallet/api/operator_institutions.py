"""Operator surface: designated institutions and the review of relationships (RULES 5, 17)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter

from wallet import institutions, relationships
from wallet.api.auth import OperatorCaller, provide_ctx, provide_operator
from wallet.api.body import StrictBody
from wallet.context import WalletContext
from wallet.institutions import CODE_PATTERN, NAME_PATTERN, InstitutionKind, InstitutionView
from wallet.relationships import RelationshipView
from wallet.rules import SettlementCategory


class RegisterInstitution(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: Annotated[str, msgspec.Meta(pattern=CODE_PATTERN)]
    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    kind: InstitutionKind
    categories: Annotated[list[SettlementCategory], msgspec.Meta(min_length=1, max_length=16)]


class InstitutionWithKey(InstitutionView, frozen=True, forbid_unknown_fields=True):
    """The institution and its API key: the key appears here once; the node keeps only
    its digest."""

    api_key: str

    @classmethod
    def of(cls, view: InstitutionView, api_key: str) -> InstitutionWithKey:
        return cls(**msgspec.structs.asdict(view), api_key=api_key)


class OperatorInstitutionsController(Controller):
    path = "/operator/v1/institutions"
    tags = ["operator: institutions"]
    dependencies = {"operator": Provide(provide_operator), "ctx": Provide(provide_ctx)}

    @post(
        "/",
        operation_id="operator_register_institution",
        dto=StrictBody[RegisterInstitution],
        return_dto=None,
    )
    async def register(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        data: JSONBody[RegisterInstitution],
    ) -> InstitutionWithKey:
        """Register a designated institution with the categories it may charge. Forbidden
        categories (cash, fitness, ...) are refused; the API key is shown once."""
        view, api_key = await institutions.register(
            ctx,
            code=data.code,
            name=data.name,
            kind=data.kind,
            categories=[c.value for c in data.categories],
            actor=operator.name,
        )
        return InstitutionWithKey.of(view, api_key)

    @get("/", operation_id="operator_list_institutions")
    async def list_all(
        self, ctx: NamedDependency[WalletContext], operator: NamedDependency[OperatorCaller]
    ) -> list[InstitutionView]:
        """Every registered institution, with its state and balance."""
        return await institutions.list_institutions(ctx)

    @post("/{code:str}/suspend", operation_id="operator_suspend_institution", status_code=200)
    async def suspend(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        code: FromPath[str],
    ) -> InstitutionView:
        """Suspend an institution: its API key is refused until it is reactivated."""
        return await institutions.suspend(ctx, code, actor=operator.name)

    @post("/{code:str}/reactivate", operation_id="operator_reactivate_institution", status_code=200)
    async def reactivate(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        code: FromPath[str],
    ) -> InstitutionView:
        """Let a suspended institution settle and refund again."""
        return await institutions.reactivate(ctx, code, actor=operator.name)

    @post(
        "/{code:str}/api-key", operation_id="operator_rotate_institution_api_key", status_code=200
    )
    async def rotate_api_key(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        code: FromPath[str],
    ) -> InstitutionWithKey:
        """Issue a new API key (shown once); the old key stops working at once."""
        view, api_key = await institutions.rotate_api_key(ctx, code, actor=operator.name)
        return InstitutionWithKey.of(view, api_key)


class OperatorRelationshipsController(Controller):
    path = "/operator/v1/relationships"
    tags = ["operator: relationships"]
    dependencies = {"operator": Provide(provide_operator), "ctx": Provide(provide_ctx)}

    @get("/", operation_id="operator_list_relationships_for_review")
    async def list_for_review(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        # `state` is a reserved parameter name in Litestar (the app state).
        state_filter: Annotated[
            Literal["pending_review"], QueryParameter(name="state")
        ] = "pending_review",
    ) -> list[RelationshipView]:
        """Relationships waiting for review, oldest first (`state=pending_review`, the only
        state operators act on)."""
        return await relationships.list_pending_review(ctx)

    @post(
        "/{relationship_id:int}/approve",
        operation_id="operator_approve_relationship",
        status_code=200,
    )
    async def approve(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        relationship_id: FromPath[int],
    ) -> RelationshipView:
        """Approve a confirmed relationship under review: it becomes active."""
        return await relationships.review(ctx, relationship_id, approve=True, actor=operator.name)

    @post(
        "/{relationship_id:int}/reject",
        operation_id="operator_reject_relationship",
        status_code=200,
    )
    async def reject(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        relationship_id: FromPath[int],
    ) -> RelationshipView:
        """Reject a confirmed relationship under review: nothing is ever shared under it."""
        return await relationships.review(ctx, relationship_id, approve=False, actor=operator.name)
