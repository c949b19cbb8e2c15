"""The signed PLT/1 envelope (PROTOCOL b.3) and its wire encodings.

    sig = Ed25519(b"PLT/1\\0" + msgpack([v, typ, msg_id, from_node, to_node, kid,
                                         created_at_ms, sha256(body)]))

The signature covers the body through its hash, so it is checked over the body bytes as
received, before anything is decoded, and it binds version, type, sender, recipient and key:
a signed message cannot be replayed as another `typ` or to another node. The transfer id is
inside the body and therefore covered as well.

Wire forms: JSON (`body` and `sig` as standard base64 strings, msgspec's bytes encoding) or
msgpack. The signature does not depend on the wire form, so stored evidence may be
re-encoded. `POST /plt/v1/messages` carries a JSON or msgpack array of envelopes and
answers with an array of signed replies, matched by position.

Key lookup is a callback `(node, kid, at_ms) -> Ed25519PublicKey`. When it raises
UnknownKey the caller fetches the sender's KEYSET once, installs it and calls
`open_envelope` again (PROTOCOL b.11); a second UnknownKey or a BadSignature is final.
"""

import hashlib
from collections.abc import Callable, Sequence
from typing import Annotated, Literal, NamedTuple

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import (
    BadSignature,
    ErrorClass,
    MalformedMessage,
    ProtocolError,
    WrongRecipient,
)
from protocol.ids import uuid7
from protocol.keys import KeyId, NodeId, SigningKey, TimeMs, node_of_kid
from protocol.messages import (
    BATCH_MAX,
    DECODE_ERRORS,
    Body,
    ErrorBody,
    ErrorReply,
    MessageType,
    Uuid7,
    decode_body,
    encode_body,
    typ_of,
)

PROTOCOL_VERSION = 1
SIGNING_PREFIX = b"PLT/1\0"
BODY_BYTES_MAX = 1 << 20  # a STATUS of 256 items with stored decisions stays far below this

Wire = Literal["json", "msgpack"]
KeyLookup = Callable[[str, str, int], Ed25519PublicKey]


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One signed message. `body` is the canonical msgpack of the body Struct of `typ`."""

    v: int
    typ: MessageType
    msg_id: Uuid7
    from_node: NodeId
    to_node: NodeId
    kid: KeyId
    created_at_ms: TimeMs
    body: Annotated[bytes, msgspec.Meta(max_length=BODY_BYTES_MAX)]
    sig: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class Opened(NamedTuple):
    """A verified envelope and its decoded body."""

    envelope: Envelope
    body: Body


_json_decoder = msgspec.json.Decoder(Envelope)
_msgpack_decoder = msgspec.msgpack.Decoder(Envelope)
_json_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_msgpack_batch_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def signing_input(
    *,
    v: int,
    typ: str,
    msg_id: str,
    from_node: str,
    to_node: str,
    kid: str,
    created_at_ms: int,
    body: bytes,
) -> bytes:
    """The exact bytes an envelope signature is made over."""
    header = [
        v,
        str(typ),
        msg_id,
        from_node,
        to_node,
        kid,
        created_at_ms,
        hashlib.sha256(body).digest(),
    ]
    return SIGNING_PREFIX + _msgpack_encoder.encode(header)


def _input_of(env: Envelope) -> bytes:
    return signing_input(
        v=env.v,
        typ=env.typ,
        msg_id=env.msg_id,
        from_node=env.from_node,
        to_node=env.to_node,
        kid=env.kid,
        created_at_ms=env.created_at_ms,
        body=env.body,
    )


def seal(
    body: Body | bytes,
    typ: MessageType,
    from_node: str,
    to_node: str,
    signing_key: SigningKey,
    now_ms: int,
    *,
    msg_id: str | None = None,
) -> Envelope:
    """Sign `body` (a body Struct, or body bytes from the outbox) as an envelope of `typ`.

    Body bytes are used as given, so a retry of stored bytes keeps its body hash even when
    it is signed again with a newer key.
    """
    if signing_key.node != from_node:
        raise ValueError(f"key {signing_key.kid!r} cannot sign for {from_node!r}")
    if isinstance(body, Body):
        if typ_of(body) is not typ:
            raise ValueError(f"{type(body).__name__} is not the body of {typ}")
        raw = encode_body(body)
    else:
        raw = body
    msg_id = msg_id if msg_id is not None else uuid7(now_ms)
    data = signing_input(
        v=PROTOCOL_VERSION,
        typ=typ,
        msg_id=msg_id,
        from_node=from_node,
        to_node=to_node,
        kid=signing_key.kid,
        created_at_ms=now_ms,
        body=raw,
    )
    return Envelope(
        v=PROTOCOL_VERSION,
        typ=typ,
        msg_id=msg_id,
        from_node=from_node,
        to_node=to_node,
        kid=signing_key.kid,
        created_at_ms=now_ms,
        body=raw,
        sig=signing_key.sign(data),
    )


def verify_signature(env: Envelope, lookup: KeyLookup, at_ms: int) -> None:
    """Check `env.sig` with the sender's key valid at `at_ms`; raises a SignatureError."""
    if node_of_kid(env.kid) != env.from_node:
        raise BadSignature(
            f"kid {env.kid!r} is not a key of {env.from_node!r}", node=env.from_node, kid=env.kid
        )
    public = lookup(env.from_node, env.kid, at_ms)
    try:
        public.verify(env.sig, _input_of(env))
    except InvalidSignature:
        raise BadSignature(
            f"signature by {env.kid!r} does not verify", node=env.from_node, kid=env.kid
        ) from None


def open_envelope(
    raw: bytes | Envelope,
    expected_to_node: str,
    lookup: KeyLookup,
    now_ms: int,
    *,
    wire: Wire | None = None,
) -> Opened:
    """Verify and decode one received envelope.

    Order: decode the envelope (MalformedMessage), version (MalformedMessage), signature
    over the body bytes as received (UnknownKey, RevokedKey, ExpiredKey, BadSignature),
    recipient (WrongRecipient), then the body for `typ` (MalformedMessage). `now_ms` is the
    receive time on this node's clock; key validity is judged at that instant.
    """
    env = raw if isinstance(raw, Envelope) else decode_envelope(raw, wire)
    if env.v != PROTOCOL_VERSION:
        raise MalformedMessage(
            f"unsupported protocol version {env.v}, this node speaks {PROTOCOL_VERSION}"
        )
    verify_signature(env, lookup, now_ms)
    if env.to_node != expected_to_node:
        raise WrongRecipient(expected=expected_to_node, got=env.to_node)
    return Opened(env, decode_body(env.typ, env.body))


def error_reply_for(
    exc: ProtocolError, env: Envelope | None = None, error_class: ErrorClass | None = None
) -> ErrorReply:
    """The ERROR body that answers a message which failed to open or to apply.

    `env` is the envelope if it decoded (its typ and body hash are echoed); pass
    `error_class=ErrorClass.F` for a bad signature that persists after a keyset refresh.
    """
    error = ErrorBody.from_exception(exc)
    if error_class is not None:
        error = ErrorBody(code=error.code, class_=error_class, text=error.text)
    return ErrorReply(
        ref_typ=env.typ if env is not None else None,
        ref_hash=hashlib.sha256(env.body).hexdigest() if env is not None else None,
        transfer_id=None,
        error=error,
    )


def created_at_skew_ms(env: Envelope, now_ms: int) -> int:
    """|created_at - receive time|; alert above CREATED_AT_SKEW_ALERT_MS (audit only)."""
    return abs(now_ms - env.created_at_ms)


def _sniff(raw: bytes) -> Wire:
    # JSON text starts with '{' or '[' (maybe after whitespace); msgpack maps and arrays never do.
    return "json" if raw.lstrip()[:1] in (b"{", b"[") else "msgpack"


def encode_envelope(env: Envelope, wire: Wire = "json") -> bytes:
    """Wire bytes of one envelope."""
    return _json_encoder.encode(env) if wire == "json" else _msgpack_encoder.encode(env)


def decode_envelope(raw: bytes, wire: Wire | None = None) -> Envelope:
    """Decode one envelope (no verification); `wire=None` detects JSON or msgpack."""
    wire = wire if wire is not None else _sniff(raw)
    try:
        return _json_decoder.decode(raw) if wire == "json" else _msgpack_decoder.decode(raw)
    except DECODE_ERRORS as exc:
        raise MalformedMessage(f"envelope: {exc}") from None


def encode_batch(envelopes: Sequence[Envelope], wire: Wire = "json") -> bytes:
    """A request or reply batch for `POST /plt/v1/messages`."""
    if len(envelopes) > BATCH_MAX:
        raise ValueError(f"a batch holds at most {BATCH_MAX} envelopes, got {len(envelopes)}")
    items = list(envelopes)
    return _json_encoder.encode(items) if wire == "json" else _msgpack_encoder.encode(items)


def decode_batch(raw: bytes, wire: Wire | None = None) -> list[Envelope | MalformedMessage]:
    """Decode a batch; each item independently, so one bad item does not sink the others.

    Raises MalformedMessage only when the outer array is unreadable or too long; a bad item
    becomes a MalformedMessage in its position (answer it with a signed ERROR reply).
    """
    wire = wire if wire is not None else _sniff(raw)
    try:
        items = (
            _json_batch_decoder.decode(raw)
            if wire == "json"
            else _msgpack_batch_decoder.decode(raw)
        )
    except DECODE_ERRORS as exc:
        raise MalformedMessage(f"batch: {exc}") from None
    if len(items) > BATCH_MAX:
        raise MalformedMessage(f"a batch holds at most {BATCH_MAX} envelopes, got {len(items)}")
    out: list[Envelope | MalformedMessage] = []
    for item in items:
        try:
            out.append(decode_envelope(bytes(item), wire))
        except MalformedMessage as exc:
            out.append(exc)
    return out
