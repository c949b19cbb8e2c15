"""Strict request bodies: JSON is decoded by msgspec with its strict rules.

Litestar converts bodies leniently (`"100"` would become the integer 100). A payment API
should not guess: a string where an amount belongs is a wrong type and is refused. Use
`dto=StrictBody[Model], return_dto=None` on every handler that takes a body; the OpenAPI
schema is the model's, as before.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec
from litestar._openapi.schema_generation import SchemaCreator
from litestar.dto import MsgspecDTO
from litestar.openapi.spec import Reference, Schema
from litestar.typing import FieldDefinition

from wallet.errors import ErrorCode, WalletError

T = TypeVar("T", bound=msgspec.Struct)
_PATH = re.compile(r"at `(\$[^`]*)`")


def body_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> WalletError:
    """Turn a msgspec refusal into a problem: amounts (`*_fen`) get their own code."""
    message = str(exc)
    match = _PATH.search(message)
    path = match[1] if match else "$"
    # Name fields the way the rest of the API does: `credits[0].amount_fen`, not `$.credits...`.
    key = path[2:] if path.startswith("$.") else path
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return WalletError(ErrorCode.INVALID_REQUEST, f"the body is not valid JSON: {message}")
    code = ErrorCode.AMOUNT_INVALID if key.endswith("_fen") else ErrorCode.INVALID_REQUEST
    return WalletError(code, message, errors=[{"key": key, "message": message}])


class StrictBody(MsgspecDTO[T], Generic[T]):
    """A DTO that only decodes: strictly, with no coercion from strings."""

    def decode_bytes(self, value: bytes) -> Any:
        try:
            return msgspec.json.decode(value, type=self.model_type, strict=True)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise body_error(exc) from exc

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        # Document the model itself: the body is decoded into it, not into a transfer model.
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))
