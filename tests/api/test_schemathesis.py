"""The fuzzing tier: schemathesis generates requests for every operation of `/schema` and a
node of a running two-province network answers them over real HTTP.

Every surface gets its credential (an app session, an institution API key, the operator
token); PLT/1 gets none, as a stranger would. Each operation gets a bounded number of
valid and of invalid examples (derandomized, so a run is repeatable); every response must
be no server error, carry a documented status and content type, and match the documented
schema. The test fails with the list of every violation found, by operation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nodes.network import LocalNetwork, LocalNode
from tests.network.support import client, enrol
from tests.support import OPERATOR

pytestmark = [pytest.mark.network, pytest.mark.anyio]

# Examples per operation and generation mode; the whole tier stays well inside 3 minutes
# on two cores. PLT_FUZZ_EXAMPLES raises it for a deeper run by hand.
EXAMPLES = int(os.environ.get("PLT_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


def _msgpack_safe(value: Any) -> Any:
    """msgpack holds integers of 64 bits: a larger generated one travels as a float (still
    a wrong value for the node to refuse)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [_msgpack_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: _msgpack_safe(item) for key, item in value.items()}
    return value


@schemathesis.serializer("application/msgpack")
def _msgpack_body(ctx: Any, value: Any) -> dict[str, Any]:
    return {"data": msgspec.msgpack.encode(_msgpack_safe(value))}


@schemathesis.deserializer("application/msgpack")
def _msgpack_reply(ctx: Any, response: Any) -> Any:
    # JSON-shaped for the schema: the binary fields as the base64 strings JSON carries.
    decoded = msgspec.msgpack.decode(response.content)
    return msgspec.json.decode(msgspec.json.encode(decoded))


async def seed(node: LocalNode) -> dict[str, dict[str, str]]:
    """A holder with an open wallet and a designated institution: the credentials by surface."""
    holder = await enrol(node, 1, "张三")
    async with client(node) as http:
        response = await http.post(
            "/operator/v1/institutions",
            json={
                "code": "H1",
                "name": "第一医院",
                "kind": "hospital",
                "categories": ["inpatient"],
            },
            headers=OPERATOR,
        )
        assert response.status_code == 201, response.text
        api_key = response.json()["api_key"]
    return {
        "/app/": holder.headers,
        "/institution/": {"Authorization": f"Bearer {api_key}"},
        "/operator/": OPERATOR,
        "/metrics": OPERATOR,
    }


def headers_for(path: str, credentials: dict[str, dict[str, str]]) -> dict[str, str]:
    for prefix, headers in credentials.items():
        if path.startswith(prefix):
            return headers
    return {}


def fuzz_operation(
    operation: Any, base_url: str, headers: dict[str, str], session: requests.Session
) -> list[str]:
    """Run both generation modes against one operation; the violations found."""
    found: list[str] = []
    for mode in MODES:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=base_url, session=session, headers=headers, checks=CHECKS
            )

        try:
            run()
        except Unsatisfiable:
            pass  # no parameters and no body: nothing to make invalid
        except (Exception, BaseExceptionGroup) as exc:  # collected, then reported together
            found.append(f"{operation.label} ({mode.value}): {exc}")
    return found


def fuzz(
    document: dict[str, Any], base_url: str, credentials: dict[str, dict[str, str]]
) -> list[str]:
    schema = schemathesis.openapi.from_dict(document)
    found: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            headers = headers_for(operation.path, credentials)
            found.extend(fuzz_operation(operation, base_url, headers, session))
    return found


async def in_thread(func: Callable[[], list[str]]) -> list[str]:
    """Blocking requests from a worker thread while the nodes serve on this event loop."""
    return await anyio.to_thread.run_sync(func)


async def test_fuzzing_finds_nothing(network: LocalNetwork) -> None:
    node = network["prov-13"]
    credentials = await seed(node)
    async with httpx.AsyncClient(base_url=node.url) as http:
        document = (await http.get("/schema/openapi.json")).json()
    assert len(document["paths"]) >= 50
    found = await in_thread(lambda: fuzz(document, node.url, credentials))
    assert found == [], "\n\n".join(found)
