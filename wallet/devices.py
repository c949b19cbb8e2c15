"""Device keys: a holder's phone signs what they authorise, the node verifies (issue 9).

The phone keeps an ECDSA P-256 key in its secure hardware; the PIN or a face check unlocks
it there, so the payment password never travels and the node checks one signature (about
0.1 ms) instead of running scrypt. Registration is confirmed by the payment password and a
fresh one-time password sent to the phone on the roster; a holder lists and revokes their
devices (lost phone); an operator revokes all of a person's devices. Registration,
revocation and every refused signature are audited; refusals count toward the payment
password's lockout (`wallet.payment_password.record_failure`).

What is signed, and how, is `protocol.device_auth`: the app names `node` and `person` as
`DeviceView.node` / `DeviceView.person` (returned at registration), `ids` and `amount_fen`
as the action needs, and `created_at_ms`, its own clock. A signature older than
`device_signature_max_age_s` (or more than `device_signature_max_skew_s` in the future) is
stale; a stale signature is refused unless the action already happened under the same ids
(a grant's idempotent replay), which the caller decides.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Annotated, NoReturn

import asyncpg
import msgspec
import structlog

from protocol.device_auth import (
    ALG_ES256,
    Action,
    DeviceAuthError,
    SignedInstruction,
    b64url,
    decode_instruction,
    differences,
    instruction,
    key_id,
    load_public_key,
    sec1,
    unb64url,
    verify_signature,
)
from protocol.messages import DeviceProof
from wallet import audit
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.idnumber import normalize_id_number
from wallet.payment_password import (
    locked_error,
    record_failure,
    record_success,
    verify_payment_password,
)
from wallet.plt.relations_store import giver_account_ref, receiver_account_ref
from wallet.wallets import OtpChallenge, request_holder_otp, with_otp

log = structlog.get_logger("wallet.devices")

Kid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class DeviceSignature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device's authorisation as the app sends it: the key id, the exact signed bytes and
    the DER signature, both base64url (`protocol.device_auth` says what to sign)."""

    kid: Kid
    # At most 2,047 bytes once decoded: what DeviceProof may carry in a PREPARE.
    signed: Annotated[str, msgspec.Meta(min_length=1, max_length=2730)]
    sig: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class DeviceView(msgspec.Struct, frozen=True):
    """A registered device. `node` and `person` are what the device puts in what it signs."""

    kid: str
    alg: str
    label: str
    public_key: str  # base64url SEC1 uncompressed point
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    node: str
    person: str  # as giver and in every action but accepting/declining a grant
    receiver: str  # the `person` of grant.accept / grant.decline


@dataclass(frozen=True)
class Verified:
    """A device signature that verified: the proof to carry, and whether it is stale."""

    proof: DeviceProof
    instruction: SignedInstruction
    stale: WalletError | None


def person_ref(person_id: int) -> str:
    """The `person` a holder's device signs as: their giver account ref (`p-<n>`), which a
    PREPARE carries. Accepting a grant signs the receiver ref (`w-<n>`) instead, which is
    what the PREPARE addresses (`receiver_ref`); `DeviceView` shows both."""
    return giver_account_ref(person_id)


def receiver_ref(person_id: int) -> str:
    return receiver_account_ref(person_id)


_COLUMNS = "kid, alg, label, public_key, created_at, revoked_at"
_LIST = f"SELECT {_COLUMNS} FROM device_key WHERE person_id = $1 ORDER BY created_at, id"
_LOCK_WALLET = "SELECT state FROM wallet WHERE person_id = $1 FOR UPDATE"
_ACTIVE = "SELECT count(*) FROM device_key WHERE person_id = $1 AND revoked_at IS NULL"
_INSERT = f"""
INSERT INTO device_key (person_id, kid, alg, public_key, label, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING
RETURNING {_COLUMNS}
"""
_REVOKE = f"""
UPDATE device_key SET revoked_at = $3, revoked_by = $4
WHERE person_id = $1 AND kid = $2 AND revoked_at IS NULL
RETURNING {_COLUMNS}
"""
_ONE = f"SELECT {_COLUMNS} FROM device_key WHERE person_id = $1 AND kid = $2"
_REVOKE_ALL = """
UPDATE device_key SET revoked_at = $2, revoked_by = $3
WHERE person_id = $1 AND revoked_at IS NULL
RETURNING kid
"""
_PERSON = "SELECT id FROM insured_person WHERE id_number = $1"
_FOR_CHECK = """
SELECT w.failed_password_attempts, w.locked_until, d.person_id AS key_person, d.alg,
       d.public_key, d.revoked_at
FROM wallet w LEFT JOIN device_key d ON d.kid = $2
WHERE w.person_id = $1 AND w.state = 'open'
"""


def _view(ctx: WalletContext, person_id: int, row: asyncpg.Record) -> DeviceView:
    return DeviceView(
        kid=row["kid"],
        alg=row["alg"],
        label=row["label"],
        public_key=b64url(row["public_key"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        node=ctx.node_id,
        person=person_ref(person_id),
        receiver=receiver_ref(person_id),
    )


def parse_public_key(alg: str, public_key: str) -> bytes:
    """The SEC1 point of a key given as base64url SEC1 or SPKI DER; 400 unless P-256."""
    try:
        raw = unb64url(public_key)
    except ValueError:
        raise WalletError(ErrorCode.DEVICE_KEY_INVALID, "public_key is not base64url") from None
    try:
        return sec1(load_public_key(alg, raw))
    except DeviceAuthError as exc:
        raise WalletError(ErrorCode.DEVICE_KEY_INVALID, str(exc), reason=exc.reason) from None


async def request_registration_otp(ctx: WalletContext, person_id: int) -> OtpChallenge:
    return await request_holder_otp(ctx, person_id, "add_device")


async def register(
    ctx: WalletContext,
    person_id: int,
    *,
    otp_id: uuid.UUID,
    otp_code: str,
    payment_password: str,
    alg: str,
    public_key: str,
    label: str,
) -> DeviceView:
    """Register a device key: the payment password and a fresh `add_device` one-time password
    confirm it; at most `devices_per_person` active keys (checked under the wallet's lock)."""
    point = parse_public_key(alg, public_key)
    kid = key_id(point)
    await verify_payment_password(ctx, person_id, payment_password)
    existing = await ctx.pool.fetchrow(_ONE, person_id, kid)
    if existing is not None and existing["revoked_at"] is None and existing["label"] == label:
        # The same registration again (its answer lost, its one-time password used up):
        # the device is registered; answer it as it is.
        return _view(ctx, person_id, existing)

    async def action(conn: asyncpg.Connection, otp_person: int) -> DeviceView:
        if otp_person != person_id:
            raise WalletError(ErrorCode.FORBIDDEN, "this one-time password is not yours")
        now = ctx.clock.now()
        await conn.fetchval(_LOCK_WALLET, person_id)
        active: int = await conn.fetchval(_ACTIVE, person_id)
        if active >= ctx.rules.devices_per_person:
            raise WalletError(
                ErrorCode.DEVICE_LIMIT_REACHED,
                f"at most {ctx.rules.devices_per_person} devices; revoke one first",
                limit=ctx.rules.devices_per_person,
            )
        row = await conn.fetchrow(_INSERT, person_id, kid, alg, point, label, now)
        if row is None:
            raise WalletError(ErrorCode.ALREADY_EXISTS, "this device key is already registered")
        await audit.record(
            conn, at=now, actor=f"person:{person_id}", action="device.register",
            subject=f"person:{person_id}", kid=kid, alg=alg, label=label,
        )  # fmt: skip
        return _view(ctx, person_id, row)

    view = await with_otp(ctx, otp_id, otp_code, "add_device", action)
    log.info("device_registered", person_id=person_id, kid=kid)
    return view


async def list_devices(ctx: WalletContext, person_id: int) -> list[DeviceView]:
    return [_view(ctx, person_id, r) for r in await ctx.pool.fetch(_LIST, person_id)]


async def revoke(ctx: WalletContext, person_id: int, kid: str) -> DeviceView:
    """Revoke one of my devices (idempotent: revoking a revoked one returns it)."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_REVOKE, person_id, kid, now, f"person:{person_id}")
        if row is None:
            row = await conn.fetchrow(_ONE, person_id, kid)
            if row is None:
                raise WalletError(ErrorCode.NOT_FOUND, f"no device {kid} of yours")
            return _view(ctx, person_id, row)
        await audit.record(
            conn, at=now, actor=f"person:{person_id}", action="device.revoke",
            subject=f"person:{person_id}", kid=kid,
        )  # fmt: skip
    log.info("device_revoked", person_id=person_id, kid=kid)
    return _view(ctx, person_id, row)


async def revoke_all(
    ctx: WalletContext, id_number: str, *, actor: str, request_id: str | None = None
) -> tuple[int, list[str]]:
    """An operator revokes every active device of a person; returns the person and key ids."""
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        person_id = await conn.fetchval(_PERSON, normalize_id_number(id_number))
        if person_id is None:
            raise WalletError(ErrorCode.NOT_FOUND, "no insured person has this ID number")
        kids = [r["kid"] for r in await conn.fetch(_REVOKE_ALL, person_id, now, actor[:80])]
        await audit.record(
            conn, at=now, actor=actor, action="device.revoke_all",
            subject=f"person:{person_id}", request_id=request_id, kids=kids,
        )  # fmt: skip
    log.info("devices_revoked", person_id=person_id, count=len(kids))
    return person_id, kids


async def verify(
    ctx: WalletContext, person_id: int, signature: DeviceSignature, want: SignedInstruction
) -> Verified:
    """Check that `person_id`'s registered, unrevoked device signed exactly `want` (its
    created_at_ms aside). Every refusal is counted toward the lockout and audited; a stale
    signature (genuine, only late) is neither: the caller decides whether it is refused."""

    async def refuse(code: ErrorCode, detail: str, reason: str, **extra: object) -> NoReturn:
        await record_failure(
            ctx, person_id, code, detail, audit_action="device.refused",
            audit_detail={"kid": signature.kid, "signed_action": want.action, "reason": reason},
            **extra,
        )  # fmt: skip

    now = ctx.clock.now()
    try:
        signed = unb64url(signature.signed)
        sig = unb64url(signature.sig)
    except ValueError:
        await refuse(ErrorCode.DEVICE_SIGNATURE_MALFORMED, "signed/sig must be base64url", "b64")
    row = await ctx.pool.fetchrow(_FOR_CHECK, person_id, signature.kid)
    if row is None:
        raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "the person has no open wallet")
    if row["locked_until"] is not None and row["locked_until"] > now:
        raise locked_error(row["locked_until"], now)
    if row["key_person"] != person_id:  # unknown, or another person's device
        await refuse(ErrorCode.DEVICE_KEY_UNKNOWN, f"no device {signature.kid} of yours", "kid")
    if row["revoked_at"] is not None:
        await refuse(ErrorCode.DEVICE_KEY_REVOKED, "this device was revoked", "revoked")
    try:
        got = decode_instruction(signed)
        differs = differences(got, want)
        if differs:
            await refuse(
                ErrorCode.DEVICE_SIGNATURE_MISMATCH,
                f"the device signed another {', '.join(differs)}",
                "mismatch",
                differs=list(differs),
            )
        verify_signature(row["alg"], row["public_key"], sig, signed)
    except DeviceAuthError as exc:
        code = (
            ErrorCode.DEVICE_SIGNATURE_INVALID
            if exc.reason == "bad_signature"
            else ErrorCode.DEVICE_SIGNATURE_MALFORMED
        )
        await refuse(code, str(exc), exc.reason)
    if row["failed_password_attempts"]:
        await record_success(ctx, person_id)
    now_ms = int(now.timestamp() * 1000)
    rules = ctx.rules
    stale = None
    if (
        got.created_at_ms < now_ms - rules.device_signature_max_age_s * 1000
        or got.created_at_ms > now_ms + rules.device_signature_max_skew_s * 1000
    ):
        stale = WalletError(
            ErrorCode.DEVICE_SIGNATURE_STALE,
            f"sign again: a device signature is valid for {rules.device_signature_max_age_s} s",
            created_at_ms=got.created_at_ms,
        )
    assert row["alg"] == ALG_ES256  # the table's CHECK; another alg needs its own verifier
    proof = DeviceProof(
        kid=signature.kid, alg="ES256", public_key=row["public_key"], sig=sig, signed=signed
    )
    return Verified(proof=proof, instruction=got, stale=stale)


async def verify_fresh(
    ctx: WalletContext, person_id: int, signature: DeviceSignature, want: SignedInstruction
) -> Verified:
    """`verify`, refusing a stale signature."""
    verified = await verify(ctx, person_id, signature, want)
    if verified.stale is not None:
        raise verified.stale
    return verified


async def authorise(
    ctx: WalletContext,
    person_id: int,
    *,
    payment_password: str | None,
    device: DeviceSignature | None,
    action: Action,
    ids: dict[str, str],
    amount_fen: int | None = None,
    person: str | None = None,
    fresh: bool = True,
) -> Verified | None:
    """A sensitive action, authorised by exactly one of the payment password or a device
    signature over (action, this node, the person, ids, amount). Returns the verified
    signature, or None for the password. `person` is the holder's giver ref unless given
    (a receiver signs as `receiver_ref`); with `fresh=False` a stale signature is returned
    with `Verified.stale` set, for the caller to judge (a grant's idempotent replay)."""
    if (payment_password is None) == (device is None):
        raise WalletError(
            ErrorCode.INVALID_REQUEST, "give exactly one of `device` and `payment_password`"
        )
    if device is None:
        assert payment_password is not None
        await verify_payment_password(ctx, person_id, payment_password)
        return None
    want = instruction(
        action,
        node=ctx.node_id,
        person=person or person_ref(person_id),
        ids=ids,
        amount_fen=amount_fen,
        created_at_ms=0,
    )
    if fresh:
        return await verify_fresh(ctx, person_id, device, want)
    return await verify(ctx, person_id, device, want)


def filing_ids(
    receiver_province: str, receiver_id_number: str, relation_type: str
) -> dict[str, str]:
    """The `ids` of a `relation.file` signature: who, where, how related (the ID number as
    normalised: uppercase X)."""
    return {
        "receiver_id_number": receiver_id_number,
        "receiver_province": receiver_province,
        "relation_type": str(relation_type),
    }
