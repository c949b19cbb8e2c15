"""RFC 9457 problem details for every refusal, and request ids on every response.

No exception reaches the client as a bare 500 page: domain errors carry their stable code,
framework errors (malformed JSON, wrong types, unknown routes) are mapped to codes here,
and anything unexpected becomes `internal_error` with the request id logged.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import structlog
from litestar import Request, Response
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ASGIApp, ExceptionHandlersMap, Message, Receive, Scope, Send

from wallet.errors import ErrorCode, WalletError, problem_body, status_of

log = structlog.get_logger("wallet.api")

PROBLEM_JSON = "application/problem+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A field whose name ends in _fen is an amount: its refusals get the amount_invalid code.
_AMOUNT_PATH = re.compile(r"_fen`?$|_fen\b")


def request_id_of(request: Request[Any, Any, Any]) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    if isinstance(value, str):
        return value
    # Unmatched routes never reach the middleware; echo a sane caller-given id there.
    incoming = request.headers.get("x-request-id", "")
    return incoming if _REQUEST_ID.match(incoming) else None


def _problem(
    request: Request[Any, Any, Any], code: ErrorCode, detail: str, **extensions: Any
) -> Response[dict[str, Any]]:
    body = problem_body(code, detail, request.url.path, request_id_of(request), **extensions)
    return Response(body, status_code=status_of(code), media_type=PROBLEM_JSON)


def wallet_error_handler(
    request: Request[Any, Any, Any], exc: WalletError
) -> Response[dict[str, Any]]:
    return _problem(request, exc.code, exc.detail, **exc.extensions)


def validation_error_handler(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict):
                errors.append({k: v for k, v in item.items() if k in ("message", "key", "source")})
    messages = " ".join(str(e.get("message", "")) for e in errors)
    keys = " ".join(str(e.get("key", "")) for e in errors)
    is_amount = _AMOUNT_PATH.search(messages) or _AMOUNT_PATH.search(keys)
    code = ErrorCode.AMOUNT_INVALID if is_amount else ErrorCode.INVALID_REQUEST
    detail = messages or str(exc.detail)
    return _problem(request, code, detail, errors=errors)


def http_error_handler(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[dict[str, Any]]:
    by_status = {
        401: ErrorCode.UNAUTHORIZED,
        403: ErrorCode.FORBIDDEN,
        404: ErrorCode.NOT_FOUND,
        405: ErrorCode.METHOD_NOT_ALLOWED,
        413: ErrorCode.REQUEST_TOO_LARGE,
        415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        503: ErrorCode.SERVICE_UNAVAILABLE,
    }
    if exc.status_code >= 500 and exc.status_code != 503:
        return internal_error_handler(request, exc)
    code = by_status.get(exc.status_code, ErrorCode.INVALID_REQUEST)
    return _problem(request, code, str(exc.detail))


# The database is out of reach (stopped, restarting, its name unresolvable, the connection
# cut): the node is unavailable, not broken. A connection cut during COMMIT leaves the
# outcome unknown to us, so the answer promises nothing about it: the client sends the same
# request again (same transfer id or reference), and the idempotent handler tells.
_DATABASE_UNAVAILABLE = (
    OSError,  # refused, reset, unknown host, timed out
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
)
DATABASE_RETRY_AFTER_S = 5


# What asyncpg says when a connection broke under an operation, rather than raising one of
# the errors above: the server was killed mid-transaction (InterfaceError "... connection is
# closed"), the pool dropped the connection while a handler still held it ("released back to
# the pool"), or the dying server's FATAL arrived between two statements of a transaction and
# left the protocol consuming it (InternalClientError "cannot switch to state ...").
_BROKEN_CONNECTION = re.compile(r"connection is closed|released back to the pool")


def _database_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_database_unavailable(inner) for inner in exc.exceptions)
    if isinstance(exc, _DATABASE_UNAVAILABLE):
        return True
    return _connection_broke(exc)


def _connection_broke(exc: BaseException) -> bool:
    """asyncpg's own errors (never ours: a bug of ours during an outage stays a 500), followed
    to a broken connection or to the outage that caused them."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while isinstance(link, asyncpg.InterfaceError | asyncpg.InternalClientError):
        if isinstance(link, asyncpg.InternalClientError) or _BROKEN_CONNECTION.search(str(link)):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
        if id(link) in seen:
            return False
    return isinstance(link, _DATABASE_UNAVAILABLE)


def internal_error_handler(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[dict[str, Any]]:
    if _database_unavailable(exc):
        # asyncpg's client-side errors keep their traceback in the log, should one ever be ours.
        log.warning(
            "database_unavailable",
            path=request.url.path,
            error=repr(exc),
            exc_info=exc if _connection_broke(exc) else None,
        )
        response = _problem(
            request, ErrorCode.SERVICE_UNAVAILABLE, "the database is unavailable; retry later"
        )
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response
    log.error("unhandled_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return _problem(
        request,
        ErrorCode.INTERNAL_ERROR,
        "an unexpected error occurred; quote the request id when reporting it",
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    WalletError: wallet_error_handler,
    ValidationException: validation_error_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Give every request an id (the caller's `X-Request-ID` if sane) and echo it back."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await app(scope, receive, send_with_id)

    return middleware
