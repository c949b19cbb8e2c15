"""Which code handles which PLT/1 message: a registry filled by the features.

The transport opens and verifies an envelope, then calls `dispatch`. A handler runs its
own local transaction and returns the body of the signed reply (or None when the message
was itself a reply and needs no answer). Handlers must be idempotent: the transport may
deliver the same message any number of times.

    transport (wallet.plt.transport)      features
    --------------------------------      -----------------------------------------
    POST /plt/v1/messages  ─┐             wallet.plt.relations  REL_* and RELEASE
    sender: replies        ─┴─ dispatch ─ wallet.plt.grants     PREPARE .. ACK, STATUS
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from protocol.messages import Body, MessageType
from wallet.context import WalletContext


@dataclass(frozen=True)
class Incoming:
    """A verified message, as the handler sees it."""

    from_node: str
    typ: MessageType
    body: Body
    body_hash: str  # SHA-256 hex of the body bytes as received
    envelope: bytes  # the whole envelope as received (evidence)
    msg_id: str
    now_ms: int
    # True when this arrived as the synchronous answer to something we sent.
    is_reply: bool = False


Handler = Callable[[WalletContext, Incoming], Awaitable[Body | None]]
# A set-oriented handler: the answers, by position, to the messages of a batch it applied.
ManyHandler = Callable[[WalletContext, Sequence[Incoming]], Awaitable[dict[int, Body | None]]]

_HANDLERS: dict[MessageType, Handler] = {}
_MANY_HANDLERS: dict[MessageType, ManyHandler] = {}


class NoHandler(LookupError):
    """No feature handles this message type at this node."""


def handles(*typs: MessageType) -> Callable[[Handler], Handler]:
    """Register a handler for message types (at import time of the feature module)."""

    def register(handler: Handler) -> Handler:
        for typ in typs:
            if typ in _HANDLERS and _HANDLERS[typ] is not handler:
                raise RuntimeError(f"{typ} already has a handler")
            _HANDLERS[typ] = handler
        return handler

    return register


def handles_many(*typs: MessageType) -> Callable[[ManyHandler], ManyHandler]:
    """Register a set-oriented handler beside the one-message handler of the same types.

    Large batches (`transport.apply_in_one_transaction`) hand it their messages of one type,
    each about a different thing, inside the batch's transaction (`ctx.pool` is the batch's
    connection) and under one savepoint. It applies those it can in a few statements and
    answers them exactly as the one-message handler would (None for a reply); it leaves out
    (no key in the answer) any message that needs more, which then goes through the
    one-message handler. If it raises, its savepoint is rolled back and every message goes
    the one-message way, so it must be idempotent in the same sense as that handler.
    """

    def register(handler: ManyHandler) -> ManyHandler:
        for typ in typs:
            if typ in _MANY_HANDLERS and _MANY_HANDLERS[typ] is not handler:
                raise RuntimeError(f"{typ} already has a set-oriented handler")
            _MANY_HANDLERS[typ] = handler
        return handler

    return register


def many_handler(typ: MessageType) -> ManyHandler | None:
    """The set-oriented handler of `typ`, if a feature registered one."""
    return _MANY_HANDLERS.get(typ)


_LOGGED_IDS = ("transfer_id", "relation_id", "release_id")


async def dispatch(ctx: WalletContext, message: Incoming) -> Body | None:
    """Hand a verified message to its feature; raise NoHandler if none is registered.

    Every log line the handler writes carries this node's id, the sender and what the
    message is about (`transfer_id`, `relation_id` or `release_id`), so one grant can be
    followed across both nodes' logs.
    """
    handler = _HANDLERS.get(message.typ)
    if handler is None:
        raise NoHandler(message.typ)
    ids = {k: v for k in _LOGGED_IDS if isinstance(v := getattr(message.body, k, None), str)}
    with structlog.contextvars.bound_contextvars(
        node=ctx.node_id, peer=message.from_node, plt_typ=message.typ.value, **ids
    ):
        return await handler(ctx, message)
