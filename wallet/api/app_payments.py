"""App surface for paying: the patient's own short-lived payment code (RULES 18)."""

from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency, Provide

from wallet import settlement
from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx
from wallet.context import WalletContext
from wallet.settlement import PaymentCodeView


class AppPaymentCodesController(Controller):
    path = "/app/v1/payment-codes"
    tags = ["app: payments"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @post("/", operation_id="app_issue_payment_code")
    async def issue(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> PaymentCodeView:
        """A single-use payment code to show at a designated institution; it expires after
        the province's `payment_code_ttl_s` and is never shown again."""
        return await settlement.issue_payment_code(ctx, caller.person_id)
