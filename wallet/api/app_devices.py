"""App and operator surfaces for device keys (issue 9, `wallet.devices`).

A holder registers the P-256 public key their phone keeps in its secure hardware (payment
password + a fresh one-time password), lists their devices and revokes one (a lost phone).
An operator revokes every device of a person (a stolen phone reported at a counter).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody

from wallet import devices
from wallet.api.auth import (
    AppCaller,
    OperatorCaller,
    provide_app_caller,
    provide_ctx,
    provide_operator,
)
from wallet.api.body import StrictBody
from wallet.api.problems import request_id_of
from wallet.context import WalletContext
from wallet.devices import DeviceView
from wallet.wallets import OtpChallenge

OtpCode = Annotated[str, msgspec.Meta(pattern="^[0-9]{6}$")]
PaymentPassword = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]


class DeviceRegistration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`public_key`: base64url of the SEC1 uncompressed point (65 bytes) or of the X.509
    SubjectPublicKeyInfo DER the phone's keystore exports. `otp_id`/`otp_code` come from
    `POST /app/v1/devices/otp`."""

    otp_id: uuid.UUID
    otp_code: OtpCode
    payment_password: PaymentPassword
    public_key: Annotated[str, msgspec.Meta(min_length=1, max_length=400)]
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    alg: Literal["ES256"] = "ES256"


class RevokedDevices(msgspec.Struct, frozen=True):
    person_id: int
    revoked: list[str]


class AppDevicesController(Controller):
    path = "/app/v1/devices"
    tags = ["app: devices"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @post("/otp", operation_id="app_request_device_otp", status_code=201)
    async def request_otp(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> OtpChallenge:
        """Send a one-time password (purpose `add_device`) to the phone on the roster."""
        return await devices.request_registration_otp(ctx, caller.person_id)

    @post(
        "/",
        operation_id="app_register_device",
        status_code=201,
        dto=StrictBody[DeviceRegistration],
        return_dto=None,
    )
    async def register(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        data: JSONBody[DeviceRegistration],
    ) -> DeviceView:
        """Register this phone's public key. The answer's `kid`, `node`, `person` and
        `receiver` are what the phone puts in what it signs (docs/plt-integration.md)."""
        return await devices.register(
            ctx,
            caller.person_id,
            otp_id=data.otp_id,
            otp_code=data.otp_code,
            payment_password=data.payment_password,
            alg=data.alg,
            public_key=data.public_key,
            label=data.label,
        )

    @get("/", operation_id="app_list_devices")
    async def list_devices(
        self, ctx: NamedDependency[WalletContext], caller: NamedDependency[AppCaller]
    ) -> list[DeviceView]:
        """My devices, revoked ones included, oldest first."""
        return await devices.list_devices(ctx, caller.person_id)

    @post("/{kid:str}/revoke", operation_id="app_revoke_device", status_code=200)
    async def revoke(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        kid: FromPath[str],
    ) -> DeviceView:
        """Revoke one of my devices: its signatures are refused from now on."""
        return await devices.revoke(ctx, caller.person_id, kid)


class OperatorDevicesController(Controller):
    path = "/operator/v1/persons"
    tags = ["operator: people and credits"]
    dependencies = {"ctx": Provide(provide_ctx), "operator": Provide(provide_operator)}

    @post(
        "/{id_number:str}/devices/revoke",
        operation_id="operator_revoke_devices",
        status_code=200,
    )
    async def revoke_all(
        self,
        ctx: NamedDependency[WalletContext],
        operator: NamedDependency[OperatorCaller],
        request: Request[Any, Any, Any],
        id_number: FromPath[str],
    ) -> RevokedDevices:
        """Revoke every active device of a person (audited)."""
        person_id, kids = await devices.revoke_all(
            ctx, id_number, actor=operator.name, request_id=request_id_of(request)
        )
        return RevokedDevices(person_id=person_id, revoked=kids)
