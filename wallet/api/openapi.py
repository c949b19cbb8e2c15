"""The OpenAPI document, made exact: what app developers generate their clients from.

Litestar describes each operation's success body from its return type. What it cannot
know is added here, once, for every operation (`finish`):

- every refusal the operation can give, by status, as `application/problem+json` with the
  problem schema of that status, whose `code` lists the stable codes of `wallet.errors`;
- who may call it: a security scheme per credential (app session, institution API key,
  operator token, metrics token), applied by surface;
- the PLT/1 bodies, in JSON and msgpack (envelopes, batches, the key set), which the
  handlers read and write as bytes and Litestar therefore sees as strings;
- the 200 an idempotent replay answers where the first request answered 201.

The statuses are the ones each operation's code paths raise (`wallet.errors` codes
through `status_of`); the schemathesis tier (tests/api/test_schemathesis.py) fuzzes every
operation and fails on any status or body the document does not describe.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from protocol.envelope import Envelope
from protocol.keys import KeySetDocument
from protocol.messages import BATCH_MAX
from wallet.api.app_payments import PaymentCodeRequest
from wallet.api.problems import PROBLEM_JSON
from wallet.errors import ErrorCode, status_of, title_of

JSON = "application/json"
MSGPACK = "application/msgpack"
SCHEMAS = "#/components/schemas/"

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "appSession": {
        "type": "http",
        "scheme": "bearer",
        "description": "A wallet holder's session token (POST /app/v1/wallets or /sessions).",
    },
    "institutionKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A designated institution's API key (issued by the operator).",
    },
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The node's operator token (setting `operator_token`).",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The node's metrics token (setting `metrics_token`).",
    },
}
# Operations of the app surface that come before a session exists.
_NO_SESSION = frozenset({"requestOtp", "openWallet", "login"})
# Path prefix -> the credentials any one of which authorises it (none: public or PLT/1,
# which is authenticated by the envelope signatures inside the body).
_SURFACES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/app/", ("appSession",)),
    ("/institution/", ("institutionKey",)),
    ("/operator/", ("operatorToken",)),
    ("/metrics", ("metricsToken", "operatorToken")),
)

# Refusals beyond the ones every operation shares (400 input, 401 credential, 404 path id,
# 413/415 body, 503 database), by operation. 404 for an unknown object named in the path or body;
# 403/422/423 wherever a payment password or a device signature authorises the action (wrong,
# no open wallet, locked).
_PASSWORD = (403, 422, 423)
_OPERATION_ERRORS: dict[str, tuple[int, ...]] = {
    "requestOtp": (404, 409, 422),
    "openWallet": (403, 404, 409, 410, 422),
    "login": (403, 404, 410, 422),
    "getWallet": (404,),
    "listWalletRecords": (404,),
    "getPerson": (404,),
    "setPersonStatus": (404,),
    "importRoster": (),
    "openWalletAtCounter": (404, 409, 422),
    "postCreditBatch": (404, 409, 422),
    "operator_revoke_devices": (404,),
    "app_file_relationship": (*_PASSWORD, 404, 409, 422),
    "app_confirm_relationship": (*_PASSWORD, 404, 409, 422),
    "app_decline_relationship": (404, 409),
    "app_end_relationship": (*_PASSWORD, 404, 409),
    "app_list_relationships": (),
    "app_order_givers": (404, 409, 422),
    "app_issue_payment_code": (*_PASSWORD, 404),
    "institution_settle": (403, 404, 409, 410, 422),
    "institution_get_settlement": (404,),
    "institution_refund_settlement": (404, 409, 422),
    "operator_register_institution": (409, 422),
    "operator_suspend_institution": (404,),
    "operator_reactivate_institution": (404,),
    "operator_rotate_institution_api_key": (404,),
    "operator_approve_relationship": (404, 409),
    "operator_reject_relationship": (404, 409),
    "resolveGrant": (404, 409),
    "app_instruct_grant": (*_PASSWORD, 404, 409, 422),
    "app_accept_grant": (*_PASSWORD, 404, 409, 422),
    "app_decline_grant": (*_PASSWORD, 404, 409, 422),
    "app_get_grant": (404,),
    "app_get_grant_receipt": (404, 409),
    "app_file_cross_relationship": (*_PASSWORD, 404, 409, 422),
    "app_confirm_cross_relationship": (*_PASSWORD, 404, 409, 422),
    "app_decline_cross_relationship": (404, 409),
    "app_end_cross_relationship": (*_PASSWORD, 404, 409),
    "app_get_cross_relationship": (404,),
    "operator_clearing_report": (404, 409),
    "operator_clear_month": (409,),
    "app_register_device": (*_PASSWORD, 404, 409, 410),
    "app_request_device_otp": (404, 422),
    "app_revoke_device": (404,),
    "pltTransferStatus": (),
    "app_mark_notifications_read": (404,),
    "app_event_stream": (429,),
}
# Handlers that read an optional JSON body themselves (Litestar sees no body parameter).
_OPTIONAL_BODIES: dict[str, type[msgspec.Struct]] = {
    "app_issue_payment_code": PaymentCodeRequest,
}
# Operations that never touch the database or need no credential at all.
_NO_DATABASE = frozenset({"health"})
# Replays of an institution's or operator's create answer 200 with the stored result.
_REPLAYS_OK = frozenset({"institution_settle", "institution_refund_settlement"})


class ContractJsonPlugin(JsonRenderPlugin):
    """Serves `/schema/openapi.json` as `finish` makes it (computed once per app)."""

    def __init__(self) -> None:
        super().__init__(path="/openapi.json")
        self._finished: dict[str, Any] | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._finished is None:
            self._finished = finish(openapi_schema)
        return self.render_json(request, self._finished)


def finish(generated: dict[str, Any]) -> dict[str, Any]:
    """The exact document from the one Litestar generated (which is left unchanged)."""
    document = copy.deepcopy(generated)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_problem_schemas())
    schemas.update(_plt_schemas())
    for name, schema in _optional_body_schemas().items():
        schemas.setdefault(name, schema)
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                _finish_operation(path, method, operation)
    return document


def _finish_operation(path: str, method: str, operation: dict[str, Any]) -> None:
    operation_id: str = operation["operationId"]
    security = _security_of(path, operation_id)
    operation["security"] = [{name: []} for name in security]
    responses: dict[str, Any] = {
        status: response
        for status, response in operation.get("responses", {}).items()
        if status.startswith("2")
    }
    if operation_id in _REPLAYS_OK:
        responses["200"] = {**responses["201"], "description": "The same request again"}
    if path.startswith("/plt/"):
        _plt_bodies(operation_id, operation, responses)
    if operation_id in _OPTIONAL_BODIES:
        name = _OPTIONAL_BODIES[operation_id].__name__
        operation["requestBody"] = {
            "required": False,
            "content": {JSON: {"schema": {"$ref": SCHEMAS + name}}},
        }
    for status in _error_statuses(operation_id, operation, bool(security)):
        responses[str(status)] = _problem_response(status)
    operation["responses"] = dict(sorted(responses.items()))


def _security_of(path: str, operation_id: str) -> tuple[str, ...]:
    if operation_id in _NO_SESSION:
        return ()
    for prefix, schemes in _SURFACES:
        if path.startswith(prefix):
            return schemes
    return ()


def _error_statuses(operation_id: str, operation: dict[str, Any], secured: bool) -> set[int]:
    statuses = {400, *_OPERATION_ERRORS.get(operation_id, ())}
    if operation_id not in _NO_DATABASE:
        statuses.add(503)
    if secured:
        statuses.add(401)
    if operation_id.startswith("institution_"):
        statuses.add(403)  # a suspended institution
    if "requestBody" in operation:
        statuses |= {413, 415}
    if any(p.get("in") == "path" for p in operation.get("parameters", [])):
        statuses.add(404)  # an id that names nothing (a NUL in the path included)
    return statuses


# --- problems ------------------------------------------------------------------------------


def _codes_by_status() -> dict[int, list[str]]:
    by_status: dict[int, list[str]] = {}
    for code in ErrorCode:
        by_status.setdefault(status_of(code), []).append(code.value)
    return by_status


def _problem_schemas() -> dict[str, Any]:
    """`Problem` (RFC 9457 with our members) and one `ProblemNNN` per status, whose `code`
    is one of that status's stable codes."""
    base: dict[str, Any] = {
        "type": "object",
        "description": "RFC 9457 problem details; switch on `code`, which never changes.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "description": "urn:plt:problem:<code>"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
            "instance": {"type": "string"},
            "request_id": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "The refused fields: `key` names the field, `message` says why.",
                "items": {"type": "object"},
            },
            "plt_code": {"type": "integer", "description": "The PLT/1 code behind a refusal."},
        },
        "additionalProperties": True,
    }
    out: dict[str, Any] = {"Problem": base}
    for status, codes in _codes_by_status().items():
        schema = copy.deepcopy(base)
        schema["description"] = f"{status}: " + "; ".join(
            f"`{c}` {title_of(ErrorCode(c)).lower()}" for c in codes
        )
        schema["properties"]["status"] = {"type": "integer", "enum": [status]}
        schema["properties"]["code"] = {"type": "string", "enum": codes}
        out[f"Problem{status}"] = schema
    return out


def _problem_response(status: int) -> dict[str, Any]:
    codes = _codes_by_status()[status]
    return {
        "description": ", ".join(codes),
        "content": {PROBLEM_JSON: {"schema": {"$ref": f"{SCHEMAS}Problem{status}"}}},
    }


def _optional_body_schemas() -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        list(_OPTIONAL_BODIES.values()), ref_template=SCHEMAS + "{name}"
    )
    return components


# --- PLT/1 -----------------------------------------------------------------------------------


def _plt_schemas() -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        [Envelope, KeySetDocument], ref_template=SCHEMAS + "{name}"
    )
    components["EnvelopeBatch"] = {
        "type": "array",
        "maxItems": BATCH_MAX,
        "items": {"$ref": f"{SCHEMAS}Envelope"},
        "description": "Signed envelopes; in msgpack, `body` and `sig` are binary.",
    }
    return components


def _both_wires(name: str) -> dict[str, Any]:
    schema = {"$ref": SCHEMAS + name}
    return {JSON: {"schema": schema}, MSGPACK: {"schema": schema}}


_PLT_BODIES: dict[str, tuple[str | None, str]] = {
    # operation id -> (request body schema, reply schema)
    "pltMessages": ("EnvelopeBatch", "EnvelopeBatch"),
    "pltStatus": ("Envelope", "Envelope"),
    "pltTransferStatus": (None, "Envelope"),
    "pltKeyset": (None, "KeySetDocument"),
}


def _plt_bodies(operation_id: str, operation: dict[str, Any], responses: dict[str, Any]) -> None:
    request_schema, reply_schema = _PLT_BODIES[operation_id]
    if request_schema is not None:
        operation["requestBody"] = {"required": True, "content": _both_wires(request_schema)}
    content = (
        {JSON: {"schema": {"$ref": SCHEMAS + reply_schema}}}
        if operation_id == "pltKeyset"
        else _both_wires(reply_schema)
    )
    responses["200"] = {"description": responses["200"]["description"], "content": content}
