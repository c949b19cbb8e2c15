"""PLT/1, the language between province nodes: envelopes, keys, messages, state machines.

Pure: no database, no network, no clock reads (time is always an argument). See
docs/protocol.md for the invariants and docs/plt1.md for the protocol itself.
"""

from protocol.envelope import (
    Envelope,
    KeyLookup,
    Opened,
    Wire,
    decode_batch,
    decode_envelope,
    encode_batch,
    encode_envelope,
    open_envelope,
    seal,
)
from protocol.errors import (
    BadKeySet,
    BadSignature,
    ErrorClass,
    ErrorCode,
    ExpiredKey,
    MalformedMessage,
    ModifiedRequest,
    ProtocolError,
    RevokedKey,
    SignatureError,
    UnknownKey,
    UnknownPeer,
    UnknownTransfer,
    ValidationFailed,
    WrongRecipient,
)
from protocol.ids import is_uuid7, uuid7, validate_uuid7
from protocol.keys import KeyRecord, KeySet, KeySetDocument, SigningKey
from protocol.messages import MessageType, body_hash, decode_body, encode_body, hash_body

__all__ = [
    "BadKeySet",
    "BadSignature",
    "Envelope",
    "ErrorClass",
    "ErrorCode",
    "ExpiredKey",
    "KeyLookup",
    "KeyRecord",
    "KeySet",
    "KeySetDocument",
    "MalformedMessage",
    "MessageType",
    "ModifiedRequest",
    "Opened",
    "ProtocolError",
    "RevokedKey",
    "SignatureError",
    "SigningKey",
    "UnknownKey",
    "UnknownPeer",
    "UnknownTransfer",
    "ValidationFailed",
    "Wire",
    "WrongRecipient",
    "body_hash",
    "decode_batch",
    "decode_body",
    "decode_envelope",
    "encode_batch",
    "encode_body",
    "encode_envelope",
    "hash_body",
    "is_uuid7",
    "open_envelope",
    "seal",
    "uuid7",
    "validate_uuid7",
]
