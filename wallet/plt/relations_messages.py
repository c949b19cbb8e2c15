"""Relationship messages from peer nodes: the handler registered with `dispatch`.

REL_REQUEST, REL_CONFIRM, REL_DECLINE and REL_END are applied in one local transaction and
answered with a signed REL_REPLY (by the giver and receiver sides and the endings). A
REL_REPLY to something this node sent stops the outbox row it answers; REL_REPLYs that
answer other messages (RELEASE) go to the hook registered with `on_rel_reply`. Importing
this module registers the handler (`wallet.plt.relations` imports it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from protocol.errors import ValidationFailed
from protocol.messages import (
    Body,
    MessageType,
    RelConfirm,
    RelDecline,
    RelEnd,
    RelReply,
    RelRequest,
    body_hash,
)
from wallet.context import WalletContext
from wallet.plt import notices, outbox
from wallet.plt.dispatch import Incoming, handles
from wallet.plt.relations_ending import confirmation_refused, on_end
from wallet.plt.relations_giver import on_answer, request_answered
from wallet.plt.relations_receiver import on_request
from wallet.plt.relations_store import log

_OUTBOX_BODY = "SELECT body FROM plt_outbox WHERE to_node = $1 AND typ = $2 AND dedup_key = $3"

ReplyHook = Callable[[WalletContext, Incoming, RelReply], Awaitable[None]]
# REL_REPLY also answers RELEASE (PROTOCOL preamble): its handler is registered here, since
# dispatch takes one handler per typ.
REPLY_HOOKS: dict[MessageType, ReplyHook] = {}


def on_rel_reply(ref_typ: MessageType) -> Callable[[ReplyHook], ReplyHook]:
    """Register the handler of REL_REPLYs answering `ref_typ` (e.g. RELEASE)."""

    def register(hook: ReplyHook) -> ReplyHook:
        if REPLY_HOOKS.get(ref_typ, hook) is not hook:
            raise RuntimeError(f"REL_REPLY to {ref_typ} already has a handler")
        REPLY_HOOKS[ref_typ] = hook
        return hook

    return register


# --- messages from the peer ------------------------------------------------------------------


@handles(
    MessageType.REL_REQUEST,
    MessageType.REL_CONFIRM,
    MessageType.REL_DECLINE,
    MessageType.REL_END,
    MessageType.REL_REPLY,
)
async def on_relation_message(ctx: WalletContext, msg: Incoming) -> Body | None:
    """Apply a relationship message from a peer node; answer it with a signed REL_REPLY."""
    body = msg.body
    if isinstance(body, RelReply):
        if not msg.is_reply:
            raise ValidationFailed("REL_REPLY is only ever a reply")
        await _on_reply(ctx, msg, body)
        return None
    if msg.is_reply:
        raise ValidationFailed(f"{msg.typ} is a request, not a reply")
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if isinstance(body, RelRequest):
            reply = await on_request(conn, msg, body)
            await notices.relation_changed(ctx, conn, "receiver", body.relation_id, now)
            return reply
        if isinstance(body, RelConfirm | RelDecline):
            reply = await on_answer(conn, msg, body)
            await notices.relation_changed(ctx, conn, "giver", body.relation_id, now)
            return reply
        if isinstance(body, RelEnd):
            return await on_end(ctx, conn, msg, body)
    raise ValidationFailed(f"{msg.typ} is not a relationship message")


async def _on_reply(ctx: WalletContext, msg: Incoming, body: RelReply) -> None:
    """The peer's REL_REPLY to something we sent: stop retrying it, apply a refusal."""
    if body.ref_typ not in (
        MessageType.REL_REQUEST,
        MessageType.REL_CONFIRM,
        MessageType.REL_DECLINE,
        MessageType.REL_END,
    ):
        hook = REPLY_HOOKS.get(body.ref_typ)
        if hook is not None:
            await hook(ctx, msg, body)
        return
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        sent = await conn.fetchval(_OUTBOX_BODY, msg.from_node, str(body.ref_typ), body.relation_id)
        if sent is None or body_hash(bytes(sent)) != body.ref_hash:
            log.warning(
                "cross_relationship_reply_unmatched",
                relation_id=body.relation_id,
                typ=str(body.ref_typ),
            )
            return
        if body.ref_typ is MessageType.REL_REQUEST:
            await request_answered(conn, body, now)
            await notices.relation_changed(ctx, conn, "giver", body.relation_id, now)
        elif body.ref_typ is MessageType.REL_CONFIRM and body.error is not None:
            await confirmation_refused(ctx, conn, msg.from_node, body, now)
        await outbox.stop(
            conn, to_node=msg.from_node, typ=body.ref_typ, key=body.relation_id, now=now
        )
