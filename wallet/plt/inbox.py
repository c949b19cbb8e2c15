"""Receiving: open each envelope of a batch, log it, hand it to its feature, seal the reply.

Used by `POST /plt/v1/messages` (a batch; position i of the reply answers position i) and by
the single-envelope STATUS endpoints. Every position gets a signed reply: the feature's
answer, or a signed ERROR with the PLT/1 code of the refusal:

    3101 malformed       the item is not an envelope, or its body is not the body of its typ
    3105 bad signature   unknown node, unknown/revoked/expired key, tampered bytes, replay
                         as another typ (class F once the sender's key set was refreshed)
    3100 validation      addressed to another node, a message this node does not take, or
                         a value its database cannot store
    3106 modified        the same id with another body (`differs` names the fields)
    3208 unknown         a transfer message and no feature here knows it
    2003 unavailable     this node failed to apply it (class T: send it again)

A refused envelope changes nothing: it is not dispatched and not written to `plt_message`
(the evidence log holds verified envelopes only; refusals go to the structured log).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import msgspec
import structlog

from protocol.clock import CREATED_AT_SKEW_ALERT_MS
from protocol.envelope import (
    Envelope,
    Wire,
    created_at_skew_ms,
    decode_envelope,
    encode_envelope,
    error_reply_for,
)
from protocol.errors import (
    BadSignature,
    ErrorClass,
    ErrorCode,
    MalformedMessage,
    ModifiedRequest,
    ProtocolError,
    ValidationFailed,
)
from protocol.keys import NODE_PATTERN
from protocol.messages import (
    DECODE_ERRORS,
    Body,
    ErrorBody,
    ErrorReply,
    MessageType,
    StatusReq,
    body_hash,
    typ_of,
)
from wallet.context import WalletContext
from wallet.plt.dispatch import Incoming, NoHandler, dispatch
from wallet.plt.node import PltNode
from wallet.plt.transport import (
    Apply,
    Logged,
    apply_in_one_transaction,
    dedup_key_of,
    join_batch,
    log_messages,
    split_batch,
)

log = structlog.get_logger("wallet.plt.inbox")

# Messages about a transfer: with no feature for them here, the honest answer is 3208.
TRANSFER_TYPES = frozenset(
    {
        MessageType.PREPARE,
        MessageType.RECEIVED,
        MessageType.DECLINE,
        MessageType.ACCEPT,
        MessageType.DECISION,
        MessageType.ACK,
        MessageType.STATUS_REQ,
        MessageType.STATUS,
    }
)
UNKNOWN_SENDER = "unknown"
_NODE = re.compile(NODE_PATTERN)


class _Claimed(msgspec.Struct):
    """The sender an undecodable item claims to be from (only to address the ERROR)."""

    from_node: object = UNKNOWN_SENDER


_claimed_json = msgspec.json.Decoder(_Claimed)
_claimed_msgpack = msgspec.msgpack.Decoder(_Claimed)


@dataclass
class _Item:
    raw: bytes
    envelope: Envelope | None = None
    incoming: Incoming | None = None
    reply: Envelope | None = None


# A message value PostgreSQL (class 22 "data exception") or asyncpg's encoder refuses: the
# message's fault, permanent (3100). The message types bound their fields so that none is
# expected; this keeps a field they miss from being answered 2003 "send it again".
_DATA_ERRORS = (asyncpg.DataError, asyncpg_base.DataError)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# An equivocating peer is frozen (peer_link); only evidence still flows with it.
ALLOWED_WHEN_FROZEN = frozenset({MessageType.STATUS, MessageType.STATUS_REQ})
_FROZEN = "SELECT node FROM peer_link WHERE node = ANY($1::text[])"


def _to_ms(instant: dt.datetime) -> int:
    return (instant - EPOCH) // dt.timedelta(milliseconds=1)


def _ms(ctx: WalletContext) -> int:
    return _to_ms(ctx.clock.now())


async def receive_batch(ctx: WalletContext, node: PltNode, raw: bytes, wire: Wire) -> bytes:
    """Answer a `POST /plt/v1/messages` body with the reply batch, in the same wire form.

    Raises MalformedMessage when the outer array is unreadable or longer than 256 (the
    caller answers 400); every item inside gets its own signed reply.
    """
    items = [_Item(raw=item) for item in split_batch(raw, wire)]
    replies = await _receive(ctx, node, items, wire)
    return join_batch([encode_envelope(env, wire) for env in replies], wire)


async def receive_one(
    ctx: WalletContext,
    node: PltNode,
    raw: bytes,
    wire: Wire,
    *,
    only: MessageType | None = None,
    transfer_id: str | None = None,
) -> Envelope:
    """Answer one envelope (the STATUS endpoints); `only` refuses other typs with 3100.

    `transfer_id`, when given, must be the only id the STATUS_REQ asks about.
    """
    item = _Item(raw=raw)
    replies = await _receive(ctx, node, [item], wire, only=only, transfer_id=transfer_id)
    return replies[0]


def decode_header_envelope(value: str) -> tuple[bytes, Wire]:
    """The envelope carried base64-encoded in a `PLT-Envelope` header (GET requests)."""
    text = value.strip()
    try:
        raw = base64.urlsafe_b64decode(
            text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
        )
    except (binascii.Error, ValueError):
        raise MalformedMessage("PLT-Envelope is not base64") from None
    wire: Wire = "json" if raw.lstrip()[:1] == b"{" else "msgpack"
    return raw, wire


async def _receive(
    ctx: WalletContext,
    node: PltNode,
    items: Sequence[_Item],
    wire: Wire,
    *,
    only: MessageType | None = None,
    transfer_id: str | None = None,
) -> list[Envelope]:
    now = ctx.clock.now()
    now_ms = _to_ms(now)
    # 1. Open every item; refusals are answered at once.
    for item in items:
        await _open(node, item, wire, now_ms, only, transfer_id)
    await _refuse_frozen(ctx, node, items, now_ms)
    # 2. Evidence first: verified envelopes are on record before any feature acts on them.
    await log_messages(
        ctx.pool,
        [
            Logged("in", item.envelope, item.raw, dedup_key_of(item.incoming.body))
            for item in items
            if item.envelope is not None and item.incoming is not None
        ],
        now,
    )

    # 3. Dispatch (transport.apply_in_one_transaction): a large batch in one transaction per
    # 32+ messages (a message that fails there is applied again alone), a small one message by
    # message; messages about one thing in batch order (a REL_END may follow its REL_REQUEST).
    # In a large batch, the messages of a type with a set-oriented handler (DECISIONs at B)
    # go to it first, a few statements for all of them (`dispatch.handles_many`).
    async def together(item: _Item, env: Envelope, incoming: Incoming, c: WalletContext) -> None:
        item.reply = await _answer(c, node, env, incoming, now_ms)

    async def alone(item: _Item, env: Envelope, incoming: Incoming) -> None:
        item.reply = await _apply(ctx, node, env, incoming, now_ms)

    def answered(item: _Item, env: Envelope, answer: Body | None) -> None:
        # A set-oriented handler's answer (`dispatch.handles_many`), sealed like `_answer`'s.
        if answer is None:
            raise ValidationFailed(f"{env.typ} is only ever a reply; nothing answers it here")
        item.reply = node.seal(typ_of(answer), env.from_node, answer, _ms_now(ctx, now_ms))

    await apply_in_one_transaction(
        ctx,
        [
            Apply(
                _key(item),
                partial(together, item, item.envelope, item.incoming),
                partial(alone, item, item.envelope, item.incoming),
                item.incoming,
                partial(answered, item, item.envelope),
            )
            for item in items
            if item.incoming is not None and item.envelope is not None
        ],
    )
    out = [
        Logged("out", item.reply, encode_envelope(item.reply, wire), _key(item))
        for item in items
        if item.incoming is not None and item.envelope is not None and item.reply is not None
    ]
    await log_messages(ctx.pool, out, ctx.clock.now())
    replies = [item.reply for item in items]
    assert all(r is not None for r in replies), "every position gets a reply"
    return [r for r in replies if r is not None]


async def _refuse_frozen(
    ctx: WalletContext, node: PltNode, items: Sequence[_Item], now_ms: int
) -> None:
    senders = {i.envelope.from_node for i in items if i.envelope is not None}
    if not senders:
        return
    frozen = {r["node"] for r in await ctx.pool.fetch(_FROZEN, sorted(senders))}
    for item in items:
        env = item.envelope
        if env is None or env.from_node not in frozen or env.typ in ALLOWED_WHEN_FROZEN:
            continue
        log.warning("plt_refused_frozen_peer", sender=env.from_node, typ=str(env.typ))
        error = ErrorBody.of(
            ErrorCode.UNAVAILABLE,
            f"{node.node_id} has frozen the link with {env.from_node}; an operator reviews it",
        )
        body = item.incoming.body if item.incoming is not None else None
        item.reply = node.seal(MessageType.ERROR, env.from_node, _error(env, body, error), now_ms)
        item.envelope = item.incoming = None


def _key(item: _Item) -> str | None:
    return dedup_key_of(item.incoming.body) if item.incoming is not None else None


async def _open(
    node: PltNode,
    item: _Item,
    wire: Wire,
    now_ms: int,
    only: MessageType | None,
    transfer_id: str | None,
) -> None:
    try:
        env = decode_envelope(item.raw, wire)
    except MalformedMessage as exc:
        sender = _claimed_sender(item.raw, wire)
        log.warning("plt_refused", code=int(exc.code), sender=sender, error=exc.message)
        item.reply = node.seal(MessageType.ERROR, sender, error_reply_for(exc), now_ms)
        return
    try:
        opened = await node.open(env, now_ms)
        if only is not None and env.typ is not only:
            raise ValidationFailed(f"this endpoint takes {only} envelopes, not {env.typ}")
        if transfer_id is not None:
            body = opened.body
            if not isinstance(body, StatusReq) or body.transfer_ids != (transfer_id,):
                raise ValidationFailed("the STATUS_REQ must ask about exactly this transfer")
    except ProtocolError as exc:
        log.warning(
            "plt_refused",
            code=int(exc.code),
            error_class=str(exc.error_class),
            sender=env.from_node,
            typ=str(env.typ),
            kid=env.kid,
            error=exc.message,
        )
        item.reply = node.seal(MessageType.ERROR, env.from_node, _error_body(exc, env), now_ms)
        return
    skew = created_at_skew_ms(env, now_ms)
    if skew > CREATED_AT_SKEW_ALERT_MS:
        log.warning("plt_clock_skew", sender=env.from_node, skew_ms=skew)
    item.envelope = env
    item.incoming = Incoming(
        from_node=env.from_node,
        typ=env.typ,
        body=opened.body,
        body_hash=body_hash(env.body),
        envelope=item.raw,
        msg_id=env.msg_id,
        now_ms=now_ms,
        is_reply=False,
    )


async def _apply(
    ctx: WalletContext, node: PltNode, env: Envelope, incoming: Incoming, now_ms: int
) -> Envelope:
    """Dispatch one verified message and seal its answer (never raises)."""
    reply: Body
    try:
        return await _answer(ctx, node, env, incoming, now_ms)
    except NoHandler:
        code = ErrorCode.UNKNOWN_TRANSFER if env.typ in TRANSFER_TYPES else ErrorCode.VALIDATION
        text = f"no feature at {node.node_id} takes {env.typ}"
        reply = _error(env, incoming.body, ErrorBody.of(code, text))
    except ProtocolError as exc:
        reply = _error_body(exc, env, incoming.body)
    except _DATA_ERRORS as exc:  # a value PostgreSQL refuses: sending it again cannot help
        log.warning("plt_apply_refused", sender=env.from_node, typ=str(env.typ), error=repr(exc))
        text = f"{node.node_id} cannot store a value of this message"
        reply = _error(env, incoming.body, ErrorBody.of(ErrorCode.VALIDATION, text))
    except Exception as exc:  # a failure here (database down, a bug) is temporary for the peer
        log.error(
            "plt_apply_failed",
            sender=env.from_node,
            typ=str(env.typ),
            error=repr(exc),
            exc_info=exc,
        )
        reply = _error(
            env,
            incoming.body,
            ErrorBody.of(ErrorCode.UNAVAILABLE, f"{node.node_id} could not apply it; send again"),
        )
    return node.seal(typ_of(reply), env.from_node, reply, _ms_now(ctx, now_ms))


async def _answer(
    ctx: WalletContext, node: PltNode, env: Envelope, incoming: Incoming, now_ms: int
) -> Envelope:
    """Dispatch one verified message and seal its answer; raises what the handler raised."""
    answer = await dispatch(ctx, incoming)
    if answer is None:
        raise ValidationFailed(f"{env.typ} is only ever a reply; nothing answers it here")
    return node.seal(typ_of(answer), env.from_node, answer, _ms_now(ctx, now_ms))


def _ms_now(ctx: WalletContext, fallback_ms: int) -> int:
    # Replies are stamped when sealed; a frozen test clock gives the receive time again.
    return max(_ms(ctx), fallback_ms)


def _error(env: Envelope, body: Body | None, error: ErrorBody) -> ErrorReply:
    transfer_id = getattr(body, "transfer_id", None) if body is not None else None
    return ErrorReply(
        ref_typ=env.typ,
        ref_hash=body_hash(env.body),
        transfer_id=transfer_id if isinstance(transfer_id, str) else None,
        error=error,
    )


def _error_body(exc: ProtocolError, env: Envelope, body: Body | None = None) -> ErrorReply:
    # A bad signature under a known key id is final: the key of a kid never changes, so no
    # key set refresh could help. (An unknown kid was refreshed once by `PltNode.open`.)
    reply = error_reply_for(exc, env, ErrorClass.F if isinstance(exc, BadSignature) else None)
    transfer_id = getattr(body, "transfer_id", None) if body is not None else None
    differs = tuple(exc.differs) if isinstance(exc, ModifiedRequest) else ()
    return msgspec.structs.replace(
        reply,
        transfer_id=transfer_id if isinstance(transfer_id, str) else None,
        differs=differs,
    )


def _claimed_sender(raw: bytes, wire: Wire) -> str:
    try:
        claimed = (_claimed_json if wire == "json" else _claimed_msgpack).decode(raw)
    except DECODE_ERRORS:
        return UNKNOWN_SENDER
    sender = claimed.from_node
    if not isinstance(sender, str) or _NODE.fullmatch(sender) is None:
        return UNKNOWN_SENDER
    return sender
