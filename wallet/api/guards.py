"""Input guards where every request enters, so bad bytes never reach PostgreSQL or a decoder.

Three classes of input crashed the node before these guards (each a 500 with
`unhandled_error`), whichever field carried them:

- a NUL character in any text: PostgreSQL's text types cannot hold it, so a query with
  one fails in the server ("invalid byte sequence");
- a value Python holds but PostgreSQL or asyncpg cannot take: a time whose UTC instant is
  outside years 1..9999 (`0001-01-01T00:00:00+14:00`), an integer beyond BIGINT;
- nesting deep enough to exhaust the decoder's recursion.

The URL (path and query) is guarded once for every route by `input_guard_middleware`, which
also refuses a body in a media type the route does not take (415). Decoded JSON bodies are
guarded by `check_value` (called by `wallet.api.body`), and query times by `check_instant`.
PLT/1 bodies are bounded in their own types (protocol.messages) and answered 3101.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from protocol.errors import ErrorCode as PltCode
from wallet.errors import ErrorCode, WalletError

BIGINT_MIN = -(2**63)
BIGINT_MAX = 2**63 - 1
JSON = "application/json"
MSGPACK = "application/msgpack"
# PLT/1 takes both encodings; every other surface takes JSON only.
_PLT_PREFIX = "/plt/v1/"
_PLT_MEDIA_TYPES = frozenset({JSON, MSGPACK})
_APP_MEDIA_TYPES = frozenset({JSON})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PLT_MALFORMED = int(PltCode.MALFORMED)


def invalid(key: str, message: str) -> WalletError:
    """The `invalid_request` problem for one field, named the way body errors name it."""
    return WalletError(
        ErrorCode.INVALID_REQUEST, message, errors=[{"key": key, "message": message}]
    )


def check_instant(value: dt.datetime | None, key: str) -> None:
    """A time PostgreSQL can compare: its UTC instant must be a date Python can hold."""
    if value is None or value.tzinfo is None:
        return
    try:
        value.astimezone(dt.UTC)
    except OverflowError:
        raise invalid(key, f"`{key}` is outside years 1..9999 once converted to UTC") from None


def check_value(value: Any, key: str = "$") -> None:
    """Walk a decoded body: no NUL in any text, every time and integer storable as given."""
    if isinstance(value, str):
        if "\x00" in value:
            raise invalid(key, f"`{key}` contains a NUL character")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not BIGINT_MIN <= value <= BIGINT_MAX:
            raise invalid(key, f"`{key}` is outside the 64-bit integer range")
    elif isinstance(value, dt.datetime):
        check_instant(value, key)
    elif isinstance(value, msgspec.Struct):
        for field in value.__struct_fields__:
            check_value(getattr(value, field), _join(key, field))
    elif isinstance(value, dict):
        for name, item in value.items():
            check_value(name, key)
            check_value(item, _join(key, str(name)))
    elif isinstance(value, list | tuple | set | frozenset):
        _check_items(value, key)


def _check_items(items: Iterable[Any], key: str) -> None:
    for index, item in enumerate(items):
        check_value(item, f"{key}[{index}]")


def _join(key: str, field: str) -> str:
    return field if key == "$" else f"{key}.{field}"


def _query_has_nul(scope: Scope) -> bool:
    """A NUL anywhere in the query string once percent-decoded (only `%00` decodes to one)."""
    query: bytes = scope.get("query_string", b"")
    return b"%00" in query or b"\x00" in query


def _refused_media_type(scope: Scope) -> str | None:
    """The media type of a body this route does not take, or None when the body is fine."""
    if scope.get("method", "GET") not in _BODY_METHODS:
        return None
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"").strip()
    has_body = b"transfer-encoding" in headers or (length not in (b"", b"0"))
    if not has_body:
        return None
    raw = headers.get(b"content-type", b"").decode("latin-1")
    media_type = raw.partition(";")[0].strip().lower()
    allowed = (
        _PLT_MEDIA_TYPES if scope.get("path", "").startswith(_PLT_PREFIX) else _APP_MEDIA_TYPES
    )
    return None if media_type in allowed else media_type or "(none)"


def input_guard_middleware(app: ASGIApp) -> ASGIApp:
    """Refuse a NUL in the URL and a body of a media type not taken (415) before the handler
    decodes or looks up anything. A path with a NUL names no object (404 `not_found`, like
    any impossible id: the path's ids are not checked here); a query with one is 400."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            if "\x00" in scope.get("path", ""):  # uvicorn has percent-decoded the path
                raise WalletError(ErrorCode.NOT_FOUND, "no object has a NUL in its name")
            if _query_has_nul(scope):
                raise invalid("query", "the query contains a NUL character")
            refused = _refused_media_type(scope)
            if refused is not None:
                raise WalletError(
                    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                    f"a body of type {refused} is not taken here; send {_expected(scope)}",
                    **_plt_malformed(scope),
                )
        await app(scope, receive, send)

    return middleware


def _plt_malformed(scope: Scope) -> dict[str, int]:
    """A peer reads the PLT/1 class of a refusal: a body it cannot send is 3101, for good."""
    return {"plt_code": PLT_MALFORMED} if scope.get("path", "").startswith(_PLT_PREFIX) else {}


def _expected(scope: Scope) -> str:
    if scope.get("path", "").startswith(_PLT_PREFIX):
        return f"{JSON} or {MSGPACK}"
    return JSON
