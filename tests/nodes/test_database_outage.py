"""When the database is out of reach a request gets 503 `service_unavailable` with
Retry-After, not 500 (the container tier stops a node's PostgreSQL for real; here the
mapping itself, through the node's own exception handlers)."""

from __future__ import annotations

import asyncpg
import pytest
from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import AsyncTestClient

from wallet.api.problems import EXCEPTION_HANDLERS, request_id_middleware


def _raised_while_handling(exc: BaseException, cause: BaseException) -> BaseException:
    """`exc` as raised inside an `except` block for `cause` (so `cause` is its context)."""
    try:
        try:
            raise cause
        except BaseException:
            raise exc  # noqa: B904 - the implicit context is the point
    except BaseException as raised:
        return raised


FAILURES: dict[str, BaseException] = {
    "refused": ConnectionRefusedError(111, "Connection refused"),
    "unknown-host": OSError(-2, "Name or service not known"),
    "starting": asyncpg.CannotConnectNowError("the database system is starting up"),
    "shutdown": asyncpg.AdminShutdownError("terminating connection"),
    "lost": asyncpg.ConnectionDoesNotExistError("connection was closed"),
    "grouped": ExceptionGroup("dependencies", [ConnectionRefusedError(111, "refused")]),
    # What asyncpg raises when the server is killed under an open transaction.
    "killed-mid-transaction": _raised_while_handling(
        asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the connection is closed"),
        asyncpg.AdminShutdownError("terminating connection due to unexpected postmaster exit"),
    ),
    "bug": RuntimeError("a real bug"),
    # ... and when the pool dropped the connection while a handler still held it.
    "released-under-us": _raised_while_handling(
        asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the connection is closed"),
        asyncpg.InterfaceError(
            "cannot call Connection.execute(): connection has been released back to the pool"
        ),
    ),
    # ... and when the dying server's FATAL arrived between two statements of a transaction.
    "fatal-between-statements": asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    ),
    "misuse": asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    "bug-during-outage": _raised_while_handling(
        KeyError("ours"), asyncpg.AdminShutdownError("terminating connection")
    ),
    "bug-among-outages": ExceptionGroup("deps", [OSError(1, "x"), KeyError("y")]),
}


@get("/fail/{failure:str}")
async def fail(failure: FromPath[str]) -> None:
    raise FAILURES[failure]


@pytest.fixture
async def outage_client() -> AsyncTestClient:  # type: ignore[type-arg]
    app = Litestar(
        route_handlers=[fail],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[request_id_middleware],
    )
    async with AsyncTestClient(app) as test_client:
        yield test_client


async def test_an_unreachable_database_is_503_with_retry_after(
    outage_client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    for failure in (
        "refused",
        "unknown-host",
        "starting",
        "shutdown",
        "lost",
        "grouped",
        "killed-mid-transaction",
        "released-under-us",
        "fatal-between-statements",
    ):
        response = await outage_client.get(f"/fail/{failure}")
        assert response.status_code == 503, failure
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["retry-after"] == "5"
        assert response.json()["code"] == "service_unavailable"


async def test_anything_else_stays_an_internal_error(
    outage_client: AsyncTestClient,  # type: ignore[type-arg]
) -> None:
    for failure in ("bug", "bug-among-outages", "misuse", "bug-during-outage"):
        response = await outage_client.get(f"/fail/{failure}")
        assert response.status_code == 500, failure
        assert response.json()["code"] == "internal_error"
