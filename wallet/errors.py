"""Errors of the province node, each with a stable code, rendered as RFC 9457 problem details.

Every refusal the API can give is an `ErrorCode`; the code string never changes once
published, so app developers can switch on it. The codes, by HTTP status:

    400 invalid_request ........ malformed JSON, wrong types, unknown fields, bad values
        id_number_invalid ...... not a GB 11643 / permit number, or a wrong check digit
        amount_invalid ......... zero, negative or beyond the largest amount accepted
        roster_file_invalid .... a roster or credit file with a bad row (line number given)
        device_signature_malformed  bad base64url/DER, signed bytes not canonical
        device_key_invalid ..... a registered key that is not P-256 (wrong curve, bad point)
    401 unauthorized ........... no, unknown or expired session token / API key / operator token
    403 payment_password_wrong . the 6-digit payment password did not match
        otp_wrong .............. the one-time password did not match
        forbidden .............. this caller may not act on this object
        device_key_unknown ..... the key id is not a device of this person
        device_key_revoked ..... the device was revoked (lost phone)
        device_signature_invalid the device signature does not verify
        device_signature_mismatch  the device signed another action/amount/relative/node/id
        device_signature_stale . the device signature is older than allowed (or from the future)
    404 not_found .............. unknown person, relationship, settlement, route, ...
    405 method_not_allowed ..... the route exists but not with this method
    409 idempotency_conflict ... same idempotency key (reference, batch id) with another body
        insufficient_funds ..... the accounts that may pay do not cover the amount
        state_conflict ......... the object is not in a state that allows this action
        already_exists ......... a wallet, institution, device key or live relationship exists
        device_limit_reached ... the person has as many active devices as allowed
    410 payment_code_expired ... the payment code is past its lifetime
        payment_code_used ...... the payment code was already used
        otp_expired ............ the one-time password is past its lifetime or used up
    413 request_too_large ...... the body is larger than the route takes
    415 unsupported_media_type . a body that is not JSON (PLT/1: not JSON or msgpack)
    422 rule_violation ......... a domain rule (docs/rules.md) forbids this (the detail says which)
        category_forbidden ..... shared money never pays for this category (RULES 17)
        person_not_eligible .... not in normal insured status / not employee scheme / no wallet
        relationship_not_allowed  not a close relative type accepted here, or limit reached
        refund_exceeds_settlement
    423 payment_password_locked  too many wrong passwords; try again later
    429 stream_limit_reached ... this session has as many open event streams as allowed
    503 service_unavailable .... the database is out of reach, or no PLT/1 keys; retry later
    500 internal_error ......... a bug: logged with the request id, never expected
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    ID_NUMBER_INVALID = "id_number_invalid"
    AMOUNT_INVALID = "amount_invalid"
    ROSTER_FILE_INVALID = "roster_file_invalid"
    DEVICE_SIGNATURE_MALFORMED = "device_signature_malformed"
    DEVICE_KEY_INVALID = "device_key_invalid"
    UNAUTHORIZED = "unauthorized"
    PAYMENT_PASSWORD_WRONG = "payment_password_wrong"
    OTP_WRONG = "otp_wrong"
    FORBIDDEN = "forbidden"
    DEVICE_KEY_UNKNOWN = "device_key_unknown"
    DEVICE_KEY_REVOKED = "device_key_revoked"
    DEVICE_SIGNATURE_INVALID = "device_signature_invalid"
    DEVICE_SIGNATURE_MISMATCH = "device_signature_mismatch"
    DEVICE_SIGNATURE_STALE = "device_signature_stale"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    STATE_CONFLICT = "state_conflict"
    ALREADY_EXISTS = "already_exists"
    DEVICE_LIMIT_REACHED = "device_limit_reached"
    PAYMENT_CODE_EXPIRED = "payment_code_expired"
    PAYMENT_CODE_USED = "payment_code_used"
    OTP_EXPIRED = "otp_expired"
    REQUEST_TOO_LARGE = "request_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    RULE_VIOLATION = "rule_violation"
    CATEGORY_FORBIDDEN = "category_forbidden"
    PERSON_NOT_ELIGIBLE = "person_not_eligible"
    RELATIONSHIP_NOT_ALLOWED = "relationship_not_allowed"
    REFUND_EXCEEDS_SETTLEMENT = "refund_exceeds_settlement"
    PAYMENT_PASSWORD_LOCKED = "payment_password_locked"
    STREAM_LIMIT_REACHED = "stream_limit_reached"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"


_STATUS_AND_TITLE: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "The request is not valid"),
    ErrorCode.ID_NUMBER_INVALID: (400, "The ID number is not valid"),
    ErrorCode.AMOUNT_INVALID: (400, "The amount is not valid"),
    ErrorCode.ROSTER_FILE_INVALID: (400, "The file has an invalid row"),
    ErrorCode.DEVICE_SIGNATURE_MALFORMED: (400, "The device signature is malformed"),
    ErrorCode.DEVICE_KEY_INVALID: (400, "The device key is not a P-256 public key"),
    ErrorCode.UNAUTHORIZED: (401, "Authentication is required"),
    ErrorCode.PAYMENT_PASSWORD_WRONG: (403, "The payment password is wrong"),
    ErrorCode.OTP_WRONG: (403, "The one-time password is wrong"),
    ErrorCode.FORBIDDEN: (403, "This action is not allowed for this caller"),
    ErrorCode.DEVICE_KEY_UNKNOWN: (403, "The device key is not registered to this person"),
    ErrorCode.DEVICE_KEY_REVOKED: (403, "The device key was revoked"),
    ErrorCode.DEVICE_SIGNATURE_INVALID: (403, "The device signature does not verify"),
    ErrorCode.DEVICE_SIGNATURE_MISMATCH: (403, "The device signed something else"),
    ErrorCode.DEVICE_SIGNATURE_STALE: (403, "The device signature is too old"),
    ErrorCode.NOT_FOUND: (404, "Not found"),
    ErrorCode.METHOD_NOT_ALLOWED: (405, "Method not allowed"),
    ErrorCode.IDEMPOTENCY_CONFLICT: (409, "The idempotency key was used with another request"),
    ErrorCode.INSUFFICIENT_FUNDS: (409, "Insufficient funds"),
    ErrorCode.STATE_CONFLICT: (409, "The object is not in a state that allows this"),
    ErrorCode.ALREADY_EXISTS: (409, "It already exists"),
    ErrorCode.DEVICE_LIMIT_REACHED: (409, "Too many devices are registered"),
    ErrorCode.PAYMENT_CODE_EXPIRED: (410, "The payment code has expired"),
    ErrorCode.PAYMENT_CODE_USED: (410, "The payment code was already used"),
    ErrorCode.OTP_EXPIRED: (410, "The one-time password has expired"),
    ErrorCode.REQUEST_TOO_LARGE: (413, "The request is too large"),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: (415, "The body's media type is not taken here"),
    ErrorCode.RULE_VIOLATION: (422, "A rule forbids this"),
    ErrorCode.CATEGORY_FORBIDDEN: (422, "Shared money may not pay for this category"),
    ErrorCode.PERSON_NOT_ELIGIBLE: (422, "The person is not eligible"),
    ErrorCode.RELATIONSHIP_NOT_ALLOWED: (422, "The relationship is not allowed"),
    ErrorCode.REFUND_EXCEEDS_SETTLEMENT: (422, "The refund exceeds what is left of the settlement"),
    ErrorCode.PAYMENT_PASSWORD_LOCKED: (423, "The payment password is locked"),
    ErrorCode.STREAM_LIMIT_REACHED: (429, "Too many open event streams"),
    ErrorCode.SERVICE_UNAVAILABLE: (503, "The service is unavailable"),
    ErrorCode.INTERNAL_ERROR: (500, "Internal error"),
}

assert set(_STATUS_AND_TITLE) == set(ErrorCode), "every error code needs a status and a title"


def status_of(code: ErrorCode) -> int:
    return _STATUS_AND_TITLE[code][0]


def title_of(code: ErrorCode) -> str:
    return _STATUS_AND_TITLE[code][1]


class WalletError(Exception):
    """A refusal with a stable code. `extensions` become extra problem-details members."""

    def __init__(self, code: ErrorCode, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extensions = extensions

    @property
    def status(self) -> int:
        return status_of(self.code)

    def problem(self, instance: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        """The RFC 9457 body for this error."""
        return problem_body(self.code, self.detail, instance, request_id, **self.extensions)

    def __repr__(self) -> str:
        return f"WalletError({self.code.value!r}, {self.detail!r})"


def problem_body(
    code: ErrorCode,
    detail: str,
    instance: str | None = None,
    request_id: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:plt:problem:{code.value}",
        "title": title_of(code),
        "status": status_of(code),
        "detail": detail,
        "code": code.value,
    }
    if instance:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    body.update(extensions)
    return body
