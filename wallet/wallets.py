"""Opening wallets and app sessions (RULES 9; DESIGN "Identity and access").

A person proves who they are by name + ID number against the roster and a one-time password
sent to the phone on the roster; then they set a 6-digit payment password. A person without
a phone opens at a counter, in person or through a guardian. Sessions are opaque bearer
tokens stored only as digests, with an expiry.
"""

from __future__ import annotations

import datetime as dt
import hmac
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import asyncpg
import msgspec
import structlog

from wallet import audit
from wallet.context import WalletContext
from wallet.credentials import (
    check_payment_password_format,
    digest,
    hash_password,
    new_numeric_code,
    new_token,
)
from wallet.errors import ErrorCode, WalletError
from wallet.idnumber import normalize_id_number
from wallet.privacy import mask_phone

log = structlog.get_logger("wallet.wallets")

OtpPurpose = Literal["open_wallet", "login"]  # the unauthenticated `POST /app/v1/otp`
# `add_device` codes go to a logged-in holder's own phone (`request_holder_otp`).
AnyOtpPurpose = Literal["open_wallet", "login", "add_device"]
CounterOpening = Literal["counter", "guardian"]
OTP_DIGITS = 6

T = TypeVar("T")


class OtpChallenge(msgspec.Struct, frozen=True):
    otp_id: uuid.UUID
    expires_at: dt.datetime
    # Where the code went, masked: enough for the holder to recognise their phone.
    phone_masked: str


class Session(msgspec.Struct, frozen=True):
    token: str
    expires_at: dt.datetime


class OpenedWallet(msgspec.Struct, frozen=True):
    person_id: int
    session: Session


_PERSON_BY_ID_NUMBER = """
SELECT p.id, p.name, p.status, p.phone, w.state AS wallet_state
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id_number = $1
"""
_INSERT_OTP = """
INSERT INTO otp_challenge (id, person_id, purpose, code_hash, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""
_LOCK_OTP = """
SELECT person_id, purpose, code_hash, attempts, expires_at, used_at
FROM otp_challenge WHERE id = $1 FOR UPDATE
"""
_COUNT_WRONG_OTP = (
    "UPDATE otp_challenge SET attempts = attempts + 1 WHERE id = $1 RETURNING attempts"
)
_USE_OTP = "UPDATE otp_challenge SET used_at = $2 WHERE id = $1"
_LOCK_PERSON = "SELECT status FROM insured_person WHERE id = $1 FOR SHARE"
_INSERT_WALLET = """
INSERT INTO wallet (person_id, state, password_hash, opened_via, guardian_person_id, opened_at)
VALUES ($1, 'open', $2, $3, $4, $5)
ON CONFLICT (person_id) DO NOTHING
RETURNING person_id
"""
_WALLET_STATE = "SELECT state FROM wallet WHERE person_id = $1 FOR SHARE"
_INSERT_SESSION = """
INSERT INTO app_session (token_hash, person_id, created_at, expires_at) VALUES ($1, $2, $3, $4)
"""
_REVOKE_SESSION = """
UPDATE app_session SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL
"""


def _same_name(roster_name: str, given: str) -> bool:
    return roster_name.strip() == given.strip()


def _otp_digest(otp_id: uuid.UUID, code: str) -> bytes:
    # Bound to the challenge, so equal codes of two challenges never share a digest.
    return digest(f"{otp_id}:{code}")


async def _roster_match(conn: asyncpg.Connection, id_number: str, name: str) -> asyncpg.Record:
    """The person with this name and ID number; the refusal never says which one differed.

    A malformed ID number is refused as such: that says nothing about the roster.
    """
    row = await conn.fetchrow(_PERSON_BY_ID_NUMBER, normalize_id_number(id_number))
    if row is None or not _same_name(row["name"], name):
        raise WalletError(ErrorCode.NOT_FOUND, "no insured person matches this name and ID number")
    return row


def _check_may_request(person: asyncpg.Record, purpose: OtpPurpose) -> None:
    if purpose == "open_wallet":
        if person["wallet_state"] is not None:
            raise WalletError(ErrorCode.ALREADY_EXISTS, "this person already has a wallet")
        if person["status"] != "normal":
            raise WalletError(
                ErrorCode.PERSON_NOT_ELIGIBLE, "only persons in normal insured status open a wallet"
            )
    elif person["wallet_state"] != "open" or person["status"] == "deceased":
        raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "this person has no open wallet")


async def request_otp(
    ctx: WalletContext, id_number: str, name: str, purpose: OtpPurpose
) -> OtpChallenge:
    """Check name + ID number against the roster and send a one-time password to the phone."""
    if purpose not in ("open_wallet", "login"):
        raise WalletError(ErrorCode.INVALID_REQUEST, "purpose is `open_wallet` or `login`")
    now = ctx.clock.now()
    otp_id = uuid.uuid4()
    code = new_numeric_code(OTP_DIGITS)
    expires_at = now + dt.timedelta(seconds=ctx.rules.otp_ttl_s)
    async with ctx.pool.acquire() as conn:
        person = await _roster_match(conn, id_number, name)
        _check_may_request(person, purpose)
        await conn.execute(
            _INSERT_OTP, otp_id, person["id"], purpose, _otp_digest(otp_id, code), now, expires_at
        )
    await ctx.otp_sender.send(person["phone"], code, purpose)
    log.info("otp_requested", person_id=person["id"], purpose=purpose)
    return OtpChallenge(
        otp_id=otp_id, expires_at=expires_at, phone_masked=mask_phone(person["phone"])
    )


_HOLDER_PHONE = """
SELECT p.phone FROM insured_person p JOIN wallet w ON w.person_id = p.id
WHERE p.id = $1 AND w.state = 'open'
"""


async def request_holder_otp(
    ctx: WalletContext, person_id: int, purpose: AnyOtpPurpose
) -> OtpChallenge:
    """A one-time password for a logged-in holder, sent to the phone on the roster."""
    now = ctx.clock.now()
    otp_id = uuid.uuid4()
    code = new_numeric_code(OTP_DIGITS)
    expires_at = now + dt.timedelta(seconds=ctx.rules.otp_ttl_s)
    async with ctx.pool.acquire() as conn:
        phone = await conn.fetchval(_HOLDER_PHONE, person_id)
        if phone is None:
            raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "this person has no open wallet")
        await conn.execute(
            _INSERT_OTP, otp_id, person_id, purpose, _otp_digest(otp_id, code), now, expires_at
        )
    await ctx.otp_sender.send(phone, code, purpose)
    log.info("otp_requested", person_id=person_id, purpose=purpose)
    return OtpChallenge(otp_id=otp_id, expires_at=expires_at, phone_masked=mask_phone(phone))


def _check_usable(
    otp: asyncpg.Record | None, purpose: AnyOtpPurpose, now: dt.datetime, max_attempts: int
) -> asyncpg.Record:
    if otp is None or otp["purpose"] != purpose:
        raise WalletError(ErrorCode.NOT_FOUND, f"no one-time password for {purpose} has this id")
    if otp["used_at"] is not None:
        raise WalletError(ErrorCode.OTP_EXPIRED, "the one-time password was already used")
    if otp["expires_at"] <= now or otp["attempts"] >= max_attempts:
        raise WalletError(
            ErrorCode.OTP_EXPIRED, "the one-time password has expired; ask for a new one"
        )
    return otp


async def with_otp(
    ctx: WalletContext,
    otp_id: uuid.UUID,
    code: str,
    purpose: AnyOtpPurpose,
    action: Callable[[asyncpg.Connection, int], Awaitable[T]],
) -> T:
    """Run `action(conn, person_id)` in the transaction that uses up the one-time password.

    A wrong code is counted and committed before the refusal, so retries are bounded; if
    `action` refuses, the code stays unused and the holder may try again.
    """
    now = ctx.clock.now()
    max_attempts = ctx.rules.otp_max_attempts
    async with ctx.pool.acquire() as conn, conn.transaction():
        otp = _check_usable(await conn.fetchrow(_LOCK_OTP, otp_id), purpose, now, max_attempts)
        if hmac.compare_digest(otp["code_hash"], _otp_digest(otp_id, code)):
            await conn.execute(_USE_OTP, otp_id, now)
            return await action(conn, otp["person_id"])
        attempts: int = await conn.fetchval(_COUNT_WRONG_OTP, otp_id)
    raise WalletError(
        ErrorCode.OTP_WRONG,
        "the one-time password is wrong",
        attempts_left=max(max_attempts - attempts, 0),
    )


async def _new_session(
    ctx: WalletContext, conn: asyncpg.Connection, person_id: int, now: dt.datetime
) -> Session:
    token = new_token("sess")
    expires_at = now + dt.timedelta(seconds=ctx.rules.session_ttl_s)
    await conn.execute(_INSERT_SESSION, digest(token), person_id, now, expires_at)
    return Session(token=token, expires_at=expires_at)


async def _insert_wallet(
    conn: asyncpg.Connection,
    person_id: int,
    password_hash: str,
    opened_via: str,
    guardian_person_id: int | None,
    now: dt.datetime,
) -> None:
    status = await conn.fetchval(_LOCK_PERSON, person_id)
    if status != "normal":
        raise WalletError(
            ErrorCode.PERSON_NOT_ELIGIBLE, "only persons in normal insured status open a wallet"
        )
    opened = await conn.fetchval(
        _INSERT_WALLET, person_id, password_hash, opened_via, guardian_person_id, now
    )
    if opened is None:
        raise WalletError(ErrorCode.ALREADY_EXISTS, "this person already has a wallet")


async def open_wallet(
    ctx: WalletContext, otp_id: uuid.UUID, otp_code: str, payment_password: str
) -> OpenedWallet:
    """Open the wallet of the person the one-time password was sent to, and log them in."""
    check_payment_password_format(payment_password)

    async def action(conn: asyncpg.Connection, person_id: int) -> OpenedWallet:
        now = ctx.clock.now()
        # scrypt runs only after the one-time password proved the caller.
        password_hash = await hash_password(payment_password, ctx.scrypt_n, ctx.password_pepper)
        await _insert_wallet(conn, person_id, password_hash, "app", None, now)
        return OpenedWallet(
            person_id=person_id, session=await _new_session(ctx, conn, person_id, now)
        )

    opened = await with_otp(ctx, otp_id, otp_code, "open_wallet", action)
    log.info("wallet_opened", person_id=opened.person_id, opened_via="app")
    return opened


async def login(ctx: WalletContext, otp_id: uuid.UUID, otp_code: str) -> Session:
    """A new session for the holder of an open wallet."""

    async def action(conn: asyncpg.Connection, person_id: int) -> Session:
        if await conn.fetchval(_WALLET_STATE, person_id) != "open":
            raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "this person has no open wallet")
        return await _new_session(ctx, conn, person_id, ctx.clock.now())

    return await with_otp(ctx, otp_id, otp_code, "login", action)


async def logout(ctx: WalletContext, token_hash: bytes) -> None:
    """End a session: its token is refused from now on."""
    await ctx.pool.execute(_REVOKE_SESSION, token_hash, ctx.clock.now())


async def open_wallet_at_counter(
    ctx: WalletContext,
    id_number: str,
    name: str,
    payment_password: str,
    opened_via: CounterOpening,
    guardian_id_number: str | None,
    *,
    actor: str,
    request_id: str | None = None,
) -> int:
    """Open a wallet for a person seen at a counter, or through their guardian (RULES 9).

    The operator has checked the papers; the roster still has to match. Returns the person id.
    """
    check_payment_password_format(payment_password)
    if opened_via not in ("counter", "guardian"):
        raise WalletError(ErrorCode.INVALID_REQUEST, "opened_via is `counter` or `guardian`")
    if (opened_via == "guardian") != (guardian_id_number is not None):
        raise WalletError(
            ErrorCode.INVALID_REQUEST,
            "a guardian ID number is given exactly when opened_via is guardian",
        )
    now = ctx.clock.now()
    password_hash = await hash_password(payment_password, ctx.scrypt_n, ctx.password_pepper)
    async with ctx.pool.acquire() as conn, conn.transaction():
        person = await _roster_match(conn, id_number, name)
        guardian_id = None
        if guardian_id_number is not None:
            guardian_id = await _guardian(conn, guardian_id_number, person["id"])
        await _insert_wallet(conn, person["id"], password_hash, opened_via, guardian_id, now)
        await audit.record(
            conn,
            at=now,
            actor=actor,
            action="wallet.open",
            subject=f"person:{person['id']}",
            request_id=request_id,
            opened_via=opened_via,
            guardian=None if guardian_id is None else f"person:{guardian_id}",
        )
    log.info("wallet_opened", person_id=person["id"], opened_via=opened_via)
    person_id: int = person["id"]
    return person_id


async def _guardian(conn: asyncpg.Connection, guardian_id_number: str, person_id: int) -> int:
    row = await conn.fetchrow(_PERSON_BY_ID_NUMBER, normalize_id_number(guardian_id_number))
    if row is None:
        raise WalletError(ErrorCode.NOT_FOUND, "the guardian is not an insured person here")
    if row["id"] == person_id:
        raise WalletError(ErrorCode.INVALID_REQUEST, "a person is not their own guardian")
    if row["status"] != "normal":
        raise WalletError(
            ErrorCode.PERSON_NOT_ELIGIBLE, "the guardian is not in normal insured status"
        )
    guardian_id: int = row["id"]
    return guardian_id
