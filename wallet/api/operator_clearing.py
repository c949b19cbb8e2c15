"""Operator surface: reconciliation windows and the monthly clearing (PROTOCOL b.10, RULES 16).

The console (`plt-node statements|reconcile|clearing`) does the same on the node's database;
these endpoints serve dashboards and the province's settlement office.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, QueryParameter

from wallet.api.auth import OperatorCaller, provide_ctx, provide_operator
from wallet.context import WalletContext
from wallet.plt import clearing, statements
from wallet.plt.clearing import ClearingReport, ClearingRun
from wallet.plt.statements import WindowView

NODE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
PREFIX_PATTERN = r"^\d{4}(-\d{2}(-\d{2}(T\d{2})?)?)?$"


class OperatorClearingController(Controller):
    path = "/operator/v1"
    tags = ["operator: reconciliation and clearing"]
    dependencies = {"operator": Provide(provide_operator), "ctx": Provide(provide_ctx)}

    @get("/reconciliation/windows", operation_id="operator_list_reconciliation_windows")
    async def windows(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        peer: Annotated[str | None, QueryParameter(pattern=NODE_PATTERN)] = None,
        prefix: Annotated[str | None, QueryParameter(pattern=PREFIX_PATTERN)] = None,
    ) -> list[WindowView]:
        """Reconciliation windows with one peer or all, optionally of a month or day
        (`prefix=2026-03`), with both statements' counts and sums and the differing buckets."""
        return await statements.list_windows(ctx, peer, prefix)

    @get("/clearing/{month:str}", operation_id="operator_clearing_report")
    async def report(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        month: FromPath[str],
    ) -> ClearingReport:
        """The month's net per pair of provinces as this node books it; a pair is
        `complete` once both USAGE directions are exchanged and booked as sent."""
        return await clearing.clearing_report(ctx, month)

    @post("/clearing/{month:str}", operation_id="operator_clear_month", status_code=201)
    async def run(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        month: FromPath[str],
    ) -> ClearingRun:
        """Clear a month, once: refused (409 `state_conflict`, `reason` `month_open` or
        `windows_not_reconciled`; 409 `already_exists` for a second run) with nothing
        changed."""
        return await clearing.run_clearing(ctx, month, actor=operator.name)
