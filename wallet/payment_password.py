"""The 6-digit payment password that confirms sensitive actions, with lockout.

A wrong password is counted in its own committed transaction before the refusal is raised,
so the count survives the rollback of whatever action it was meant to confirm.
"""

from __future__ import annotations

import datetime as dt

from wallet.context import WalletContext
from wallet.credentials import verify_password
from wallet.errors import ErrorCode, WalletError

_SELECT = """
SELECT password_hash, failed_password_attempts, locked_until FROM wallet
WHERE person_id = $1 AND state = 'open' FOR UPDATE
"""
_RESET = """
UPDATE wallet SET failed_password_attempts = 0, locked_until = NULL
WHERE person_id = $1 AND (failed_password_attempts <> 0 OR locked_until IS NOT NULL)
"""
_FAIL = """
UPDATE wallet SET
    failed_password_attempts = CASE WHEN failed_password_attempts + 1 >= $2 THEN 0
                                    ELSE failed_password_attempts + 1 END,
    locked_until = CASE WHEN failed_password_attempts + 1 >= $2 THEN $3 ELSE locked_until END
WHERE person_id = $1
RETURNING failed_password_attempts, locked_until
"""


async def verify_payment_password(ctx: WalletContext, person_id: int, password: str) -> None:
    """Raise unless `password` is the open wallet's payment password and it is not locked."""
    now = ctx.clock.now()
    rules = ctx.rules
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_SELECT, person_id)
        if row is None:
            raise WalletError(ErrorCode.PERSON_NOT_ELIGIBLE, "the person has no open wallet")
        locked_until: dt.datetime | None = row["locked_until"]
        if locked_until is not None and locked_until > now:
            raise WalletError(
                ErrorCode.PAYMENT_PASSWORD_LOCKED,
                "too many wrong payment passwords; try again later",
                retry_after_s=int((locked_until - now).total_seconds()) + 1,
            )
        if await verify_password(password, row["password_hash"]):
            await conn.execute(_RESET, person_id)
            return
        failed = await conn.fetchrow(
            _FAIL,
            person_id,
            rules.password_max_failures,
            now + dt.timedelta(seconds=rules.password_lockout_s),
        )
    if failed["locked_until"] is not None and failed["locked_until"] > now:
        raise WalletError(
            ErrorCode.PAYMENT_PASSWORD_LOCKED,
            "too many wrong payment passwords; the payment password is locked",
            retry_after_s=rules.password_lockout_s,
        )
    raise WalletError(
        ErrorCode.PAYMENT_PASSWORD_WRONG,
        "the payment password is wrong",
        attempts_left=rules.password_max_failures - failed["failed_password_attempts"],
    )
