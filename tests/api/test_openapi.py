"""The OpenAPI document describes the API that answers: problems as application/problem+json
with their codes, credentials per surface, PLT/1 bodies in JSON and msgpack, real schemas."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

pytestmark = pytest.mark.anyio

Client = AsyncTestClient  # type: ignore[type-arg]
PROBLEM = "application/problem+json"


@pytest.fixture
async def document(client: Client) -> dict[str, Any]:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def operation(document: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    found: dict[str, Any] = document["paths"][path][method]
    return found


async def test_errors_are_problems_with_their_codes(document: dict[str, Any]) -> None:
    accept = operation(document, "/app/v1/grants/incoming/{transfer_id}/accept", "post")
    assert sorted(accept["responses"]) == [
        "200", "400", "401", "403", "404", "409", "413", "415", "422", "423", "503"
    ]  # fmt: skip
    assert accept["responses"]["423"]["content"] == {
        PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem423"}}
    }
    problem_409 = document["components"]["schemas"]["Problem409"]
    assert problem_409["properties"]["code"]["enum"] == [
        "idempotency_conflict",
        "insufficient_funds",
        "state_conflict",
        "already_exists",
        "device_limit_reached",
    ]
    assert all(
        "application/json" not in response.get("content", {})
        for path in document["paths"].values()
        for op in path.values()
        for status, response in op["responses"].items()
        if not status.startswith("2")
    )


async def test_credentials_are_declared_and_applied(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert sorted(schemes) == ["appSession", "institutionKey", "metricsToken", "operatorToken"]
    assert operation(document, "/app/v1/wallet", "get")["security"] == [{"appSession": []}]
    assert operation(document, "/app/v1/sessions", "post")["security"] == []
    assert operation(document, "/institution/v1/settlements", "post")["security"] == [
        {"institutionKey": []}
    ]
    assert operation(document, "/operator/v1/audit", "get")["security"] == [{"operatorToken": []}]
    assert operation(document, "/metrics", "get")["security"] == [
        {"metricsToken": []},
        {"operatorToken": []},
    ]
    assert operation(document, "/plt/v1/messages", "post")["security"] == []


async def test_plt_bodies_in_json_and_msgpack(document: dict[str, Any]) -> None:
    messages = operation(document, "/plt/v1/messages", "post")
    batch = {"schema": {"$ref": "#/components/schemas/EnvelopeBatch"}}
    both = {"application/json": batch, "application/msgpack": batch}
    assert messages["requestBody"]["content"] == both
    assert messages["responses"]["200"]["content"] == both
    keyset = operation(document, "/plt/v1/keyset", "get")
    assert keyset["responses"]["200"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/KeySetDocument"}}
    }
    transfer = operation(document, "/plt/v1/transfers/{transfer_id}", "get")
    envelope = transfer["responses"]["200"]["content"]["application/json"]["schema"]
    assert envelope == {"$ref": "#/components/schemas/Envelope"}
    assert document["components"]["schemas"]["Envelope"]["type"] == "object"


async def test_institution_replays_document_their_200(document: dict[str, Any]) -> None:
    settle = operation(document, "/institution/v1/settlements", "post")
    assert settle["responses"]["200"]["content"] == settle["responses"]["201"]["content"]


async def test_notification_refusals_are_documented(document: dict[str, Any]) -> None:
    stream = operation(document, "/app/v1/events", "get")
    assert sorted(stream["responses"]) == ["200", "400", "401", "429", "503"]
    assert stream["responses"]["200"]["content"].keys() == {"text/event-stream"}
    mark = operation(document, "/app/v1/notifications/read", "post")
    assert "404" in mark["responses"]
