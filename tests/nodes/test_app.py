"""The node starts, migrates and answers; framework errors become problem details."""

from __future__ import annotations

from litestar.testing import AsyncTestClient


async def test_health_names_the_node(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "node_id": "prov-13", "province_code": "130000"}
    assert response.headers["x-request-id"]


async def test_ready_checks_the_database(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


async def test_unknown_route_is_a_problem_document(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/no/such/route", headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "not_found"
    assert body["type"] == "urn:plt:problem:not_found"
    assert body["request_id"] == "abc-123"
    assert body["instance"] == "/no/such/route"


async def test_openapi_is_served(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    assert response.json()["paths"]["/health"]["get"]["operationId"] == "health"
