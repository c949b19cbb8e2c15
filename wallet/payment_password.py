"""The 6-digit payment password that confirms sensitive actions, with lockout.

The KDF (scrypt, ~50 ms of a core) never runs while this request holds a pooled connection
or an open transaction: a burst of password checks would otherwise pin the pool and every
other request would queue behind them. So a check is three short steps:

 1. one statement *reserves* the attempt: it counts it as a failure in advance and reads the
    hash, unless the wallet is locked or as many attempts as the limit are already counted
    (so a burst of parallel guesses gets at most `password_max_failures` KDF runs, as when
    checks were serialised by a row lock);
 2. the KDF runs in a thread, no connection held;
 3. one statement records the outcome: success clears the count (and replaces a hash made
    before the pepper, guarded by `password_hash = <the hash we checked>` so a concurrent
    change wins), failure locks the wallet if the reserved count reached the limit.

The count survives the rollback of whatever action the password was meant to confirm: it is
committed on its own. Failed device signatures (`wallet.devices`) count toward the same
lockout through `record_failure`.
"""

from __future__ import annotations

import datetime as dt
from typing import NoReturn

import asyncpg
import structlog

from wallet import audit, notices
from wallet.context import WalletContext
from wallet.credentials import (
    PepperUnavailable,
    hash_password,
    needs_upgrade,
    verify_password,
)
from wallet.errors import ErrorCode, WalletError

log = structlog.get_logger("wallet.payment_password")

_RESERVE = """
UPDATE wallet SET failed_password_attempts = failed_password_attempts + 1
WHERE person_id = $1 AND state = 'open' AND (locked_until IS NULL OR locked_until <= $2)
  AND failed_password_attempts < $3
RETURNING password_hash, failed_password_attempts
"""
_STATE = """
SELECT failed_password_attempts, locked_until FROM wallet WHERE person_id = $1 AND state = 'open'
"""
_SUCCEEDED = """
UPDATE wallet SET failed_password_attempts = 0, locked_until = NULL,
    password_hash = CASE WHEN password_hash = $2 AND $3::text IS NOT NULL THEN $3
                         ELSE password_hash END
WHERE person_id = $1
RETURNING password_hash = $3 AS upgraded
"""
# After a reserved attempt failed: the count already includes it.
_RESERVED_FAILED = """
UPDATE wallet SET
    failed_password_attempts = CASE WHEN failed_password_attempts >= $2 THEN 0
                                    ELSE failed_password_attempts END,
    locked_until = CASE WHEN failed_password_attempts >= $2 THEN $3 ELSE locked_until END
WHERE person_id = $1
RETURNING failed_password_attempts, locked_until
"""
# A failure counted now (a device signature that did not verify).
_FAIL = """
UPDATE wallet SET
    failed_password_attempts = CASE WHEN failed_password_attempts + 1 >= $2 THEN 0
                                    ELSE failed_password_attempts + 1 END,
    locked_until = CASE WHEN failed_password_attempts + 1 >= $2 THEN $3 ELSE locked_until END
WHERE person_id = $1
RETURNING failed_password_attempts, locked_until
"""
_RESET = """
UPDATE wallet SET failed_password_attempts = 0, locked_until = NULL
WHERE person_id = $1 AND (failed_password_attempts <> 0 OR locked_until IS NOT NULL)
"""


def locked_error(locked_until: dt.datetime, now: dt.datetime) -> WalletError:
    return WalletError(
        ErrorCode.PAYMENT_PASSWORD_LOCKED,
        "too many wrong payment passwords or device signatures; try again later",
        retry_after_s=int((locked_until - now).total_seconds()) + 1,
    )


async def _refuse_reservation(ctx: WalletContext, person_id: int, now: dt.datetime) -> WalletError:
    row = await ctx.pool.fetchrow(_STATE, person_id)
    if row is None:
        return WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "the person has no open wallet")
    locked_until: dt.datetime | None = row["locked_until"]
    if locked_until is not None and locked_until > now:
        return locked_error(locked_until, now)
    # As many checks as the limit are in flight: this one would exceed it.
    return WalletError(
        ErrorCode.PAYMENT_PASSWORD_LOCKED,
        "too many payment password checks at once; try again shortly",
        retry_after_s=1,
    )


async def verify_payment_password(ctx: WalletContext, person_id: int, password: str) -> None:
    """Raise unless `password` is the open wallet's payment password and it is not locked."""
    now = ctx.clock.now()
    rules = ctx.rules
    reserved = await ctx.pool.fetchrow(_RESERVE, person_id, now, rules.password_max_failures)
    if reserved is None:
        raise await _refuse_reservation(ctx, person_id, now)
    stored: str = reserved["password_hash"]
    pepper = ctx.password_pepper
    try:
        ok = await verify_password(password, stored, pepper)
    except PepperUnavailable as exc:
        await ctx.pool.execute(_RESET, person_id)  # our fault, not the holder's
        log.error("password_pepper_unavailable", person_id=person_id, detail=str(exc))
        raise WalletError(
            ErrorCode.SERVICE_UNAVAILABLE, "payment passwords cannot be checked right now"
        ) from None
    if ok:
        upgraded = (
            await hash_password(password, ctx.scrypt_n, pepper)
            if needs_upgrade(stored, pepper)
            else None
        )
        row = await ctx.pool.fetchrow(_SUCCEEDED, person_id, stored, upgraded)
        if upgraded is not None and row is not None and row["upgraded"]:
            log.info("password_hash_upgraded", person_id=person_id)
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        failed = await conn.fetchrow(
            _RESERVED_FAILED,
            person_id,
            rules.password_max_failures,
            now + dt.timedelta(seconds=rules.password_lockout_s),
        )
        await _notify_if_locked(conn, person_id, failed, now)
    _raise_failure(
        ctx, failed, now, ErrorCode.PAYMENT_PASSWORD_WRONG, "the payment password is wrong"
    )


async def _notify_if_locked(
    conn: asyncpg.Connection, person_id: int, failed: asyncpg.Record | None, now: dt.datetime
) -> None:
    """This failure locked the wallet: tell its holder, with the failure's transaction."""
    locked_until: dt.datetime | None = None if failed is None else failed["locked_until"]
    if locked_until is not None and locked_until > now:
        await notices.wallet_locked(conn, person_id, locked_until, now)


def _raise_failure(
    ctx: WalletContext,
    failed: asyncpg.Record | None,
    now: dt.datetime,
    code: ErrorCode,
    detail: str,
    **extra: object,
) -> NoReturn:
    rules = ctx.rules
    assert failed is not None
    locked_until: dt.datetime | None = failed["locked_until"]
    if locked_until is not None and locked_until > now:
        raise WalletError(
            ErrorCode.PAYMENT_PASSWORD_LOCKED,
            f"{detail}; too many failures, the payment password and devices are locked",
            retry_after_s=rules.password_lockout_s,
            cause=str(code),
            **extra,
        )
    raise WalletError(
        code,
        detail,
        attempts_left=rules.password_max_failures - failed["failed_password_attempts"],
        **extra,
    )


async def record_failure(
    ctx: WalletContext,
    person_id: int,
    code: ErrorCode,
    detail: str,
    *,
    audit_action: str,
    audit_detail: dict[str, str],
    **extra: object,
) -> NoReturn:
    """Count one failed verification (a device signature) toward the lockout and audit it in
    one transaction, then raise `code` (or `payment_password_locked` if this locked it)."""
    now = ctx.clock.now()
    rules = ctx.rules
    async with ctx.pool.acquire() as conn, conn.transaction():
        failed = await conn.fetchrow(
            _FAIL,
            person_id,
            rules.password_max_failures,
            now + dt.timedelta(seconds=rules.password_lockout_s),
        )
        if failed is not None:
            await audit.record(
                conn,
                at=now,
                actor=f"person:{person_id}",
                action=audit_action,
                subject=f"person:{person_id}",
                code=str(code),
                **audit_detail,
            )
            await _notify_if_locked(conn, person_id, failed, now)
    if failed is None:
        raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "the person has no open wallet")
    _raise_failure(ctx, failed, now, code, detail, **extra)


async def record_success(ctx: WalletContext, person_id: int) -> None:
    """A verified device signature clears the failure count (no write when there is none)."""
    await ctx.pool.execute(_RESET, person_id)
