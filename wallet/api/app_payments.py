"""App surface for paying: the patient's own short-lived payment code (RULES 18)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, post
from litestar.di import NamedDependency, Provide

from wallet import devices, settlement
from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx
from wallet.api.body import decode_json
from wallet.context import WalletContext
from wallet.devices import DeviceSignature
from wallet.settlement import PaymentCodeView


class PaymentCodeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Optional: a device signature (`payment_code.issue`, ids {}, amount null)."""

    device: DeviceSignature


_request = msgspec.json.Decoder(PaymentCodeRequest, strict=True)


class AppPaymentCodesController(Controller):
    path = "/app/v1/payment-codes"
    tags = ["app: payments"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @post("/", operation_id="app_issue_payment_code")
    async def issue(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        request: Request[Any, Any, Any],
    ) -> PaymentCodeView:
        """A single-use payment code to show at a designated institution; it expires after
        the province's `payment_code_ttl_s` and is never shown again. With a body
        `{"device": ...}` the phone's signature authorises it too (refused if it fails)."""
        raw = await request.body()
        if raw.strip():
            body = decode_json(raw, _request)
            await devices.authorise(
                ctx, caller.person_id, payment_password=None, device=body.device,
                action="payment_code.issue", ids={},
            )  # fmt: skip
        return await settlement.issue_payment_code(ctx, caller.person_id)
