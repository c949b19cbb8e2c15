"""Strict request bodies: JSON is decoded by msgspec with its strict rules.

Litestar converts bodies leniently (`"100"` would become the integer 100). A payment API
should not guess: a string where an amount belongs is a wrong type and is refused. Use
`dto=StrictBody[Model], return_dto=None` on every handler that takes a body; the OpenAPI
schema is the model's, as before.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Generic, TypeVar

import msgspec
from litestar._openapi.schema_generation import SchemaCreator
from litestar.dto import MsgspecDTO
from litestar.openapi.spec import Reference, Schema
from litestar.typing import FieldDefinition

from wallet.api.guards import check_value
from wallet.errors import ErrorCode, WalletError

T = TypeVar("T", bound=msgspec.Struct)
_PATH = re.compile(r"at `(\$[^`]*)`")


def decode_json(raw: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode a JSON body strictly and guard it (`wallet.api.guards.check_value`): every
    refusal, nesting too deep for the decoder included, is an `invalid_request` problem."""
    try:
        value = decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise body_error(exc) from exc
    except RecursionError:
        raise WalletError(ErrorCode.INVALID_REQUEST, "the body is nested too deeply") from None
    check_value(value)
    return value


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


@functools.cache
def _decoder_of(model_type: type[Any]) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(model_type, strict=True)


class StrictBody(MsgspecDTO[T], Generic[T]):
    """A DTO that only decodes: strictly, with no coercion from strings."""

    def decode_bytes(self, value: bytes) -> Any:
        return decode_json(value, _decoder_of(self.model_type))

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        # Document the model itself: the body is decoded into it, not into a transfer model.
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))
