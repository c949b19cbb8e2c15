"""The app surface for wallet holders: one-time passwords, opening, sessions, balances, records."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

import msgspec
from litestar import Controller, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery, JSONBody, QueryParameter

from wallet import records, wallets
from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx, provide_session_to_end
from wallet.api.body import StrictBody
from wallet.api.guards import check_instant
from wallet.context import WalletContext
from wallet.records import RecordPage, WalletView
from wallet.roster import IdNumberText
from wallet.wallets import OtpChallenge, OtpPurpose, Session

OtpCode = Annotated[str, msgspec.Meta(pattern="^[0-9]{6}$")]
# The format (6 digits, not trivial) is checked by the service with a precise message.
PaymentPassword = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class OtpRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id_number: IdNumberText
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    purpose: OtpPurpose


class OpenWalletRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    otp_id: uuid.UUID
    otp_code: OtpCode
    payment_password: PaymentPassword


class LoginRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    otp_id: uuid.UUID
    otp_code: OtpCode


class WalletOpened(msgspec.Struct, frozen=True):
    token: str
    expires_at: dt.datetime
    wallet: WalletView


_AS_HOLDER = {"caller": Provide(provide_app_caller)}


class AppWalletController(Controller):
    path = "/app/v1"
    tags = ["app: wallet"]
    dependencies = {"ctx": Provide(provide_ctx)}

    @post(
        "/otp",
        operation_id="requestOtp",
        status_code=201,
        dto=StrictBody[OtpRequest],
        return_dto=None,
    )
    async def request_otp(
        self, ctx: NamedDependency[WalletContext], data: JSONBody[OtpRequest]
    ) -> OtpChallenge:
        """Send a one-time password to the phone on the roster, after a name + ID number match.

        `purpose` is `open_wallet` (no wallet yet, normal insured status) or `login`.
        """
        return await wallets.request_otp(ctx, data.id_number, data.name, data.purpose)

    @post(
        "/wallets",
        operation_id="openWallet",
        status_code=201,
        dto=StrictBody[OpenWalletRequest],
        return_dto=None,
    )
    async def open_wallet(
        self, ctx: NamedDependency[WalletContext], data: JSONBody[OpenWalletRequest]
    ) -> WalletOpened:
        """Open the wallet with the one-time password and a 6-digit payment password; log in."""
        opened = await wallets.open_wallet(ctx, data.otp_id, data.otp_code, data.payment_password)
        view = await records.wallet_view(ctx, opened.person_id)
        return WalletOpened(
            token=opened.session.token, expires_at=opened.session.expires_at, wallet=view
        )

    @post(
        "/sessions",
        operation_id="login",
        status_code=201,
        dto=StrictBody[LoginRequest],
        return_dto=None,
    )
    async def login(
        self, ctx: NamedDependency[WalletContext], data: JSONBody[LoginRequest]
    ) -> Session:
        """Log in to an open wallet with a one-time password of purpose `login`."""
        return await wallets.login(ctx, data.otp_id, data.otp_code)

    @delete(
        "/sessions/current",
        operation_id="logout",
        status_code=204,
        dependencies={"caller": Provide(provide_session_to_end)},
    )
    async def logout(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> None:
        """End the session whose token authorises this request (again: still 204)."""
        await wallets.logout(ctx, caller.token_hash)

    @get("/wallet", operation_id="getWallet", dependencies=_AS_HOLDER)
    async def get_wallet(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> WalletView:
        """The holder's wallet: person (ID number masked), wallet state, personal account balance."""
        return await records.wallet_view(ctx, caller.person_id)

    @get("/wallet/records", operation_id="listWalletRecords", dependencies=_AS_HOLDER)
    async def list_records(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        limit: Annotated[int, QueryParameter(ge=1, le=records.MAX_PAGE)] = records.DEFAULT_PAGE,
        before_id: Annotated[int | None, QueryParameter(ge=1, le=2**63 - 1)] = None,
        direction: FromQuery[records.Direction | None] = None,
        purpose: Annotated[str | None, QueryParameter(min_length=1, max_length=40)] = None,
        since: FromQuery[dt.datetime | None] = None,
        until: FromQuery[dt.datetime | None] = None,
    ) -> RecordPage:
        """Every record in and out, newest first, with counterpart and purpose (RULES 10).

        Page with `before_id` = the previous page's `next_before_id`. `since` is inclusive,
        `until` exclusive.
        """
        check_instant(since, "since")
        check_instant(until, "until")
        return await records.list_records(
            ctx,
            caller.person_id,
            limit=limit,
            before_id=before_id,
            direction=direction,
            purpose=purpose,
            since=since,
            until=until,
        )
