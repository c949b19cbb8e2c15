"""Who is calling: a wallet holder (session token), an institution (API key) or an operator.

The three credentials are separate and never interchangeable: each surface's controllers
depend on exactly one of these providers.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from litestar import Request
from litestar.di import NamedDependency

from wallet.context import WalletContext
from wallet.credentials import digest
from wallet.errors import ErrorCode, WalletError

_SESSION_PERSON = """
SELECT s.person_id FROM app_session s JOIN wallet w ON w.person_id = s.person_id
WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > $2 AND w.state = 'open'
"""
_ANY_SESSION = "SELECT person_id FROM app_session WHERE token_hash = $1"
_INSTITUTION = (
    "SELECT id, code, name, categories, account_id, state FROM institution WHERE api_key_hash = $1"
)


@dataclass(frozen=True)
class AppCaller:
    person_id: int
    token_hash: bytes


@dataclass(frozen=True)
class InstitutionCaller:
    institution_id: int
    code: str
    name: str
    categories: tuple[str, ...]
    account_id: int


@dataclass(frozen=True)
class OperatorCaller:
    name: str


def context_of(request: Request[Any, Any, Any]) -> WalletContext:
    ctx: WalletContext = request.app.state.ctx
    return ctx


def _bearer(request: Request[Any, Any, Any]) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise WalletError(ErrorCode.UNAUTHORIZED, "send `Authorization: Bearer <token>`")
    return token.strip()


async def provide_ctx(request: Request[Any, Any, Any]) -> WalletContext:
    return context_of(request)


async def provide_app_caller(request: Request[Any, Any, Any]) -> AppCaller:
    """The wallet holder behind a session token."""
    ctx = context_of(request)
    token_hash = digest(_bearer(request))
    person_id = await ctx.pool.fetchval(_SESSION_PERSON, token_hash, ctx.clock.now())
    if person_id is None:
        raise WalletError(ErrorCode.UNAUTHORIZED, "the session token is unknown or has expired")
    return AppCaller(person_id=person_id, token_hash=token_hash)


async def provide_session_to_end(request: Request[Any, Any, Any]) -> AppCaller:
    """The holder of a session being ended: any token this node issued, live or not, so a
    logout sent again after it took effect gets the same answer (the session is ended)."""
    ctx = context_of(request)
    token_hash = digest(_bearer(request))
    person_id = await ctx.pool.fetchval(_ANY_SESSION, token_hash)
    if person_id is None:
        raise WalletError(ErrorCode.UNAUTHORIZED, "the session token is unknown")
    return AppCaller(person_id=person_id, token_hash=token_hash)


async def provide_connection(request: Request[Any, Any, Any]) -> AsyncIterator[asyncpg.Connection]:
    """One pooled connection for the whole request (the key lookup and the handler's work):
    a request acquires and releases once."""
    async with context_of(request).pool.acquire() as conn:
        yield conn


async def provide_institution(
    request: Request[Any, Any, Any], conn: NamedDependency[asyncpg.Connection]
) -> InstitutionCaller:
    """The designated institution behind an API key (looked up on the request's connection,
    `provide_connection`, which the institution surface provides as `conn`)."""
    row = await conn.fetchrow(_INSTITUTION, digest(_bearer(request)))
    if row is None:
        raise WalletError(ErrorCode.UNAUTHORIZED, "the API key is unknown")
    if row["state"] != "active":
        raise WalletError(ErrorCode.FORBIDDEN, "the institution is suspended")
    return InstitutionCaller(
        institution_id=row["id"],
        code=row["code"],
        name=row["name"],
        categories=tuple(row["categories"]),
        account_id=row["account_id"],
    )


async def provide_operator(request: Request[Any, Any, Any]) -> OperatorCaller:
    """An operator of this province, holding the node's operator token."""
    expected: str = request.app.state.operator_token
    token = _bearer(request)
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise WalletError(ErrorCode.UNAUTHORIZED, "the operator token is wrong")
    name = request.headers.get("x-operator-name", "operator")[:64]
    return OperatorCaller(name=name)
