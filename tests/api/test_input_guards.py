"""Inputs that once crashed the node (500, `unhandled_error`) are refused with a 400 problem.

Each class is closed where input enters: a NUL anywhere in the URL, a NUL or an
unstorable value in any JSON body, a time outside years 1..9999 once in UTC, a body in a
media type the route does not take (415).
"""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, bearer, import_persons, open_wallet, person
from wallet.otp import RecordingOtpSender

pytestmark = pytest.mark.anyio

Client = AsyncTestClient  # type: ignore[type-arg]
OUT_OF_RANGE_TIMES = [
    "0001-01-01T00:00:00%2B14:00",
    "9999-12-31T23:59:59-23:59",
]


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert (body["status"], body["code"]) == (status, code)
    return body


@pytest.fixture
async def holder(client: Client, otp: RecordingOtpSender) -> dict[str, str]:
    """A wallet holder's session headers."""
    row = person(1, "张三")
    await import_persons(client, row)
    return bearer(await open_wallet(client, otp, row))


async def test_nul_in_a_query_is_refused(client: Client, holder: dict[str, str]) -> None:
    response = await client.get("/app/v1/wallet/records?purpose=%00", headers=holder)
    body = assert_problem(response, 400, "invalid_request")
    assert body["errors"] == [{"key": "query", "message": "the query contains a NUL character"}]


@pytest.mark.parametrize("which", ["since", "until"])
@pytest.mark.parametrize("instant", OUT_OF_RANGE_TIMES)
async def test_record_times_outside_the_calendar_are_refused(
    client: Client, holder: dict[str, str], which: str, instant: str
) -> None:
    response = await client.get(f"/app/v1/wallet/records?{which}={instant}", headers=holder)
    body = assert_problem(response, 400, "invalid_request")
    assert body["errors"] == [
        {"key": which, "message": f"`{which}` is outside years 1..9999 once converted to UTC"}
    ]


async def test_record_times_inside_the_calendar_still_work(
    client: Client, holder: dict[str, str]
) -> None:
    response = await client.get(
        "/app/v1/wallet/records?since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59Z",
        headers=holder,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"records": [], "next_before_id": None}


async def test_nul_in_a_path_id_names_nothing(client: Client, holder: dict[str, str]) -> None:
    response = await client.get("/app/v1/grants/%00/receipt", headers=holder)
    body = assert_problem(response, 404, "not_found")
    assert body["detail"] == "no object has a NUL in its name"


@pytest.mark.parametrize("query", ["subject=%00", "action=%00", "action=grant%00x"])
async def test_nul_in_audit_filters_is_refused(client: Client, query: str) -> None:
    response = await client.get(f"/operator/v1/audit?{query}", headers=OPERATOR)
    assert_problem(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "since", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00%2B14:00", "999999d"]
)
async def test_audit_since_outside_the_calendar_is_refused(client: Client, since: str) -> None:
    response = await client.get(f"/operator/v1/audit?since={since}", headers=OPERATOR)
    body = assert_problem(response, 400, "invalid_request")
    assert "within years 1..9999 in UTC" in body["detail"]


async def test_audit_since_far_back_inside_the_calendar_works(client: Client) -> None:
    response = await client.get("/operator/v1/audit?since=0001-01-01", headers=OPERATOR)
    assert response.status_code == 200, response.text
    assert response.json() == []


async def test_nul_in_a_json_body_is_refused_and_nothing_stored(client: Client) -> None:
    row = person(2, "李\u0000四")
    response = await client.post("/operator/v1/roster", json={"persons": [row]}, headers=OPERATOR)
    body = assert_problem(response, 400, "invalid_request")
    assert body["errors"] == [
        {"key": "persons[0].name", "message": "`persons[0].name` contains a NUL character"}
    ]
    response = await client.get(f"/operator/v1/persons/{row['id_number']}", headers=OPERATOR)
    assert_problem(response, 404, "not_found")


async def test_deeply_nested_json_body_is_refused(client: Client) -> None:
    nested = b'{"persons": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = await client.post(
        "/operator/v1/roster",
        content=nested,
        headers={**OPERATOR, "content-type": "application/json"},
    )
    assert_problem(response, 400, "invalid_request")


async def test_a_body_that_is_not_json_gets_415(client: Client) -> None:
    response = await client.post(
        "/operator/v1/roster",
        content=b'{"persons": []}',
        headers={**OPERATOR, "content-type": "text/plain"},
    )
    body = assert_problem(response, 415, "unsupported_media_type")
    assert body["detail"] == "a body of type text/plain is not taken here; send application/json"
