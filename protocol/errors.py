"""PLT/1 error codes (PROTOCOL b.13) and the exceptions raised by `protocol`.

Codes follow the FSPIOP families; classes follow ILPv4: F (final, do not retry the same
request), T (temporary, a retry may succeed), R (relative to a deadline that has passed).

Exception tree::

    ProtocolError                 .code (ErrorCode), .error_class (ErrorClass)
     ├── MalformedMessage         3101 F  undecodable envelope or body, unknown typ, bad version,
     │                                    body bytes not in canonical encoding
     ├── ValidationFailed         3100 F  well formed but not acceptable
     │    └── WrongRecipient      3100 F  envelope addressed to another node
     ├── SignatureError           3105    anything about who signed
     │    ├── BadSignature        T, F after one keyset refresh
     │    ├── UnknownKey          T       refresh the sender's KEYSET once, then retry
     │    ├── UnknownPeer         F       the sender is not in the peer directory
     │    ├── RevokedKey          F       received at or after the key's revoked_at
     │    ├── ExpiredKey          F       received after the key's not_after
     │    └── BadKeySet           F       KEYSET document fails its root signature or rules
     ├── ModifiedRequest          3106 F  same id, different body; .differs names the fields
     └── UnknownTransfer          3208 F
"""

from enum import IntEnum, StrEnum


class ErrorClass(StrEnum):
    """ILPv4 error class: final, temporary, or relative to an expired deadline."""

    F = "F"
    T = "T"
    R = "R"


class ErrorCode(IntEnum):
    """Every PLT/1 error code, with its default class and a short title."""

    UNAVAILABLE = 2003
    BUSY = 2005
    VALIDATION = 3100
    MALFORMED = 3101
    BAD_SIGNATURE = 3105
    MODIFIED_REQUEST = 3106
    RECEIVER_WALLET_NOT_OPEN = 3204
    UNKNOWN_TRANSFER = 3208
    EXPIRED = 3303
    GIVER_INSUFFICIENT_BALANCE = 4000
    EXPOSURE_CAP = 4001
    GIVER_LIMIT = 4200
    GIVER_PERMISSION = 4300
    RECEIVER_DECLINED = 5104
    RECEIVER_CHECK_FAILED = 5105
    RECEIVER_LIMIT = 5200

    @property
    def error_class(self) -> ErrorClass:
        """Default class of the code.

        3105 is T until the sender's keyset was refreshed once, then F (PROTOCOL b.11);
        4300 is F for a missing or dissolved relation, T for the 22:00-06:00 blackout:
        callers pass the class explicitly in those cases.
        """
        return _CLASSES[self]

    @property
    def title(self) -> str:
        """A short English title, used as the default error text."""
        return _TITLES[self]


_CLASSES: dict[ErrorCode, ErrorClass] = {
    ErrorCode.UNAVAILABLE: ErrorClass.T,
    ErrorCode.BUSY: ErrorClass.T,
    ErrorCode.VALIDATION: ErrorClass.F,
    ErrorCode.MALFORMED: ErrorClass.F,
    ErrorCode.BAD_SIGNATURE: ErrorClass.T,
    ErrorCode.MODIFIED_REQUEST: ErrorClass.F,
    ErrorCode.RECEIVER_WALLET_NOT_OPEN: ErrorClass.F,
    ErrorCode.UNKNOWN_TRANSFER: ErrorClass.F,
    ErrorCode.EXPIRED: ErrorClass.R,
    ErrorCode.GIVER_INSUFFICIENT_BALANCE: ErrorClass.F,
    ErrorCode.EXPOSURE_CAP: ErrorClass.T,
    ErrorCode.GIVER_LIMIT: ErrorClass.F,
    ErrorCode.GIVER_PERMISSION: ErrorClass.F,
    ErrorCode.RECEIVER_DECLINED: ErrorClass.F,
    ErrorCode.RECEIVER_CHECK_FAILED: ErrorClass.F,
    ErrorCode.RECEIVER_LIMIT: ErrorClass.F,
}

_TITLES: dict[ErrorCode, str] = {
    ErrorCode.UNAVAILABLE: "service unavailable",
    ErrorCode.BUSY: "busy, retry later",
    ErrorCode.VALIDATION: "validation failed",
    ErrorCode.MALFORMED: "malformed message",
    ErrorCode.BAD_SIGNATURE: "bad signature",
    ErrorCode.MODIFIED_REQUEST: "modified request: same id, different body",
    ErrorCode.RECEIVER_WALLET_NOT_OPEN: "receiver wallet not found or not open",
    ErrorCode.UNKNOWN_TRANSFER: "unknown transfer",
    ErrorCode.EXPIRED: "expired",
    ErrorCode.GIVER_INSUFFICIENT_BALANCE: "giver has insufficient balance",
    ErrorCode.EXPOSURE_CAP: "node exposure cap reached",
    ErrorCode.GIVER_LIMIT: "giver limit reached",
    ErrorCode.GIVER_PERMISSION: "giver not permitted: relationship not filed or dissolved",
    ErrorCode.RECEIVER_DECLINED: "receiver declined",
    ErrorCode.RECEIVER_CHECK_FAILED: "receiver-side check failed",
    ErrorCode.RECEIVER_LIMIT: "receiver limit reached",
}


class ProtocolError(Exception):
    """Base of every error raised by `protocol`; `.code` is what goes on the wire."""

    code: ErrorCode = ErrorCode.VALIDATION
    error_class: ErrorClass = ErrorClass.F

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedMessage(ProtocolError):
    """The bytes do not decode to a PLT/1 envelope or to the body its `typ` announces."""

    code = ErrorCode.MALFORMED


class ValidationFailed(ProtocolError):
    """Well-formed input that the protocol does not accept."""

    code = ErrorCode.VALIDATION


class WrongRecipient(ValidationFailed):
    """A validly signed envelope whose `to_node` is not this node."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"envelope is addressed to {got!r}, this node is {expected!r}")
        self.expected = expected
        self.got = got


class SignatureError(ProtocolError):
    """Who signed cannot be established; carries the sender node and key id when known."""

    code = ErrorCode.BAD_SIGNATURE

    def __init__(self, message: str, *, node: str = "", kid: str = "") -> None:
        super().__init__(message)
        self.node = node
        self.kid = kid


class BadSignature(SignatureError):
    """The Ed25519 signature does not verify over the envelope's signing input."""

    error_class = ErrorClass.T


class UnknownKey(SignatureError):
    """The sender's cached keyset has no such `kid`: refresh it once and try again."""

    error_class = ErrorClass.T


class UnknownPeer(SignatureError):
    """The sender is not in the peer directory (no pinned root key)."""


class RevokedKey(SignatureError):
    """The key was revoked before the message was received."""


class ExpiredKey(SignatureError):
    """The message was received after the key's `not_after`."""


class BadKeySet(SignatureError):
    """A KEYSET document is not signed by the pinned root, is for another node, or rolls back."""


class ModifiedRequest(ProtocolError):
    """A message reuses an id with a different body (TigerBeetle's `exists_with_different_*`)."""

    code = ErrorCode.MODIFIED_REQUEST

    def __init__(self, differs: list[str]) -> None:
        super().__init__(f"same id, different body: {', '.join(differs) or '?'} differ")
        self.differs = differs


class UnknownTransfer(ProtocolError):
    """The transfer id is not known to this node."""

    code = ErrorCode.UNKNOWN_TRANSFER
