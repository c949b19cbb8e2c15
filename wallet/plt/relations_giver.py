"""The giver's side of a cross-province relationship, at the giver's node (A).

The giver files (RULES 5); A records the filing and queues the signed REL_REQUEST to the
receiver's node in one transaction. A then applies the receiver node's REL_REPLY to that
request (delivered, or refused: 3204, 5105, ...) and its REL_CONFIRM or REL_DECLINE.
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from protocol.errors import ErrorCode, UnknownPeer
from protocol.ids import uuid7
from protocol.messages import (
    ErrorBody,
    GiverRef,
    MessageType,
    RelConfirm,
    RelDecline,
    RelReceiver,
    RelReply,
    RelRequest,
    body_hash,
    encode_body,
)
from protocol.messages import RelationType as WireRelationType
from wallet import devices
from wallet.context import WalletContext
from wallet.devices import DeviceSignature, filing_ids
from wallet.errors import ErrorCode as WalletCode
from wallet.errors import WalletError
from wallet.idnumber import normalize_id_number
from wallet.plt import outbox
from wallet.plt.dispatch import Incoming
from wallet.plt.relations_lookup import load_view
from wallet.plt.relations_store import (
    LOCK_SIDE,
    CrossRelationshipView,
    CrossState,
    from_ms,
    giver_account_ref,
    log,
    record_audit,
    reply_to,
    store_reply,
    stored_reply,
    to_ms,
)
from wallet.privacy import mask_name
from wallet.rules import RelationType

NAME_CHARS_MAX = 64  # RelReceiver.name on the wire

_LOCK_GIVER = """
SELECT p.id, p.name, p.id_number, p.scheme, p.status, w.state AS wallet_state
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id = $1
FOR NO KEY UPDATE OF p
"""
# RULES 4 counts every live receiver of the giver, in-province and cross-province.
_COUNT_LIVE_RECEIVERS = """
SELECT (SELECT count(*) FROM relationship
        WHERE giver_person_id = $1 AND state IN ('pending_confirmation', 'pending_review', 'active'))
     + (SELECT count(*) FROM cross_relationship
        WHERE side = 'giver' AND person_id = $1 AND state IN ('requested', 'active'))
"""
_LIVE_FILING = """
SELECT relation_id, relation_type, evidence_ref FROM cross_relationship
WHERE side = 'giver' AND person_id = $1 AND other_id_number = $2 AND other_province = $3
  AND state IN ('requested', 'active')
"""
_INSERT_GIVER_SIDE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, person_id, other_name, other_id_number, other_province,
     relation_type, evidence_ref, state, request_hash, filed_at)
VALUES ($1, 'giver', $2, $3, $4, $5, $6, $7, $8, 'requested', $9, $10)
RETURNING id
"""
_CONFIRMED_AT_GIVER = """
UPDATE cross_relationship SET state = 'active', confirmed_at = $2, other_ref = $3,
    delivered_at = coalesce(delivered_at, $2)
WHERE id = $1 AND state = 'requested'
RETURNING id
"""
_DECLINED_AT_GIVER = """
UPDATE cross_relationship SET state = 'declined', declined_at = $2,
    delivered_at = coalesce(delivered_at, $2)
WHERE id = $1 AND state = 'requested'
RETURNING id
"""
_DELIVERED = """
UPDATE cross_relationship SET delivered_at = $2 WHERE id = $1 AND delivered_at IS NULL
"""
_REFUSED_AT_GIVER = """
UPDATE cross_relationship SET state = 'refused', refusal_code = $2, refusal_text = $3,
    delivered_at = coalesce(delivered_at, $4)
WHERE id = $1 AND state = 'requested'
RETURNING id
"""


# --- filing, at the giver's node -----------------------------------------------------------


async def file(
    ctx: WalletContext,
    giver_person_id: int,
    *,
    receiver_province: str,
    receiver_id_number: str,
    receiver_name: str,
    relation_type: RelationType,
    evidence_ref: str,
    payment_password: str | None = None,
    device: DeviceSignature | None = None,
) -> CrossRelationshipView:
    """The giver files a relationship with a relative insured in another province.

    All eight close-relative types are accepted: the province's in-province list (RULES 2
    `[cfg]`) does not apply across provinces. The request goes to the receiver's node in
    the same transaction that records the filing.
    """
    if ctx.plt is None:
        raise WalletError(
            WalletCode.SERVICE_UNAVAILABLE, "this node is not connected to other provinces"
        )
    id_number = normalize_id_number(receiver_id_number)
    name = receiver_name.strip()
    if not 1 <= len(name) <= NAME_CHARS_MAX:
        raise WalletError(
            WalletCode.INVALID_REQUEST, f"the name has 1 to {NAME_CHARS_MAX} characters"
        )
    if receiver_province == ctx.province_code:
        raise WalletError(
            WalletCode.RELATIONSHIP_NOT_ALLOWED,
            "the relative is insured in this province: file at /app/v1/relationships",
            reason="same_province",
        )
    try:
        peer = ctx.plt.node_for_province(receiver_province)
    except UnknownPeer:
        raise WalletError(
            WalletCode.RELATIONSHIP_NOT_ALLOWED,
            f"province {receiver_province} is not connected to this node for mutual aid",
            reason="province_not_connected",
        ) from None
    await devices.authorise(
        ctx, giver_person_id, payment_password=payment_password, device=device,
        action="relation.file", ids=filing_ids(receiver_province, id_number, relation_type),
    )  # fmt: skip
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        giver = await conn.fetchrow(_LOCK_GIVER, giver_person_id)
        _check_giver(giver)
        assert giver is not None
        if giver["id_number"] == id_number:
            raise WalletError(
                WalletCode.RELATIONSHIP_NOT_ALLOWED,
                "a person cannot share with themselves",
                reason="self",
            )
        live = await conn.fetchrow(_LIVE_FILING, giver_person_id, id_number, receiver_province)
        if live is not None:
            if (live["relation_type"], live["evidence_ref"]) != (relation_type, evidence_ref):
                raise WalletError(
                    WalletCode.ALREADY_EXISTS,
                    "a live relationship with this relative already exists",
                )
            # The same filing again (its first answer lost): where it stands now.
            return await load_view(conn, ctx, live["relation_id"], giver_person_id)
        limit = ctx.rules.max_receivers_per_giver
        if (
            limit is not None
            and await conn.fetchval(_COUNT_LIVE_RECEIVERS, giver_person_id) >= limit
        ):
            raise WalletError(
                WalletCode.RELATIONSHIP_NOT_ALLOWED,
                f"a giver may share with at most {limit} receivers (RULES 4)",
                reason="receiver_limit",
                limit=limit,
            )
        relation_id = uuid7(to_ms(now))
        request = RelRequest(
            relation_id=relation_id,
            giver=GiverRef(
                node=ctx.node_id,
                account_ref=giver_account_ref(giver_person_id),
                masked_name=mask_name(giver["name"])[:NAME_CHARS_MAX],
            ),
            receiver=RelReceiver(id_number=id_number, name=name),
            relation_type=WireRelationType(relation_type.value),
            evidence_ref=evidence_ref,
            filed_at_ms=to_ms(now),
        )
        raw = encode_body(request)
        try:
            await conn.fetchval(
                _INSERT_GIVER_SIDE,
                relation_id,
                peer,
                giver_person_id,
                name,
                id_number,
                receiver_province,
                relation_type.value,
                evidence_ref,
                body_hash(raw),
                now,
            )
        except asyncpg.UniqueViolationError as exc:
            raise WalletError(
                WalletCode.ALREADY_EXISTS,
                "a live relationship with this relative already exists",
            ) from exc
        await outbox.enqueue(
            conn, to_node=peer, typ=MessageType.REL_REQUEST, key=relation_id, body=raw, now=now
        )
        await record_audit(
            conn,
            now,
            f"person:{giver_person_id}",
            "cross_relationship.file",
            relation_id,
            peer=peer,
        )
        view = await load_view(conn, ctx, relation_id, giver_person_id)
    log.info("cross_relationship_filed", relation_id=relation_id, peer=peer)
    return view


def _check_giver(row: asyncpg.Record | None) -> None:
    if row is None:
        raise WalletError(WalletCode.NOT_FOUND, "the giver is not on the roster")
    if row["scheme"] != "employee":
        raise WalletError(
            WalletCode.PERSON_NOT_ELIGIBLE,
            "only members of the employee scheme can share their personal account (RULES 1)",
        )
    if row["status"] != "normal":
        raise WalletError(
            WalletCode.PERSON_NOT_ELIGIBLE, "the giver is not in normal insured status"
        )
    if row["wallet_state"] != "open":
        raise WalletError(WalletCode.PERSON_NOT_ELIGIBLE, "the giver has no open wallet")


# --- the receiver's node answers, at the giver's node ----------------------------------------


async def on_answer(
    conn: asyncpg.Connection, msg: Incoming, body: RelConfirm | RelDecline
) -> RelReply:
    """REL_CONFIRM or REL_DECLINE from the receiver's node, at the giver's node."""
    row = await conn.fetchrow(LOCK_SIDE, "giver", body.relation_id)
    if row is None or row["peer_node"] != msg.from_node:
        return reply_to(
            msg, body.relation_id, ErrorBody.of(ErrorCode.UNKNOWN_TRANSFER, "unknown relationship")
        )
    stored = await stored_reply(conn, row["id"], msg)
    if stored is not None:
        return stored
    now = from_ms(msg.now_ms)
    state = row["state"]
    error: ErrorBody | None = None
    if body.request_hash != row["request_hash"]:
        error = ErrorBody.of(ErrorCode.VALIDATION, "the answer does not match the request filed")
    elif isinstance(body, RelConfirm):
        if (
            await conn.fetchval(_CONFIRMED_AT_GIVER, row["id"], now, body.receiver_account_id)
            is None
        ):
            error = ErrorBody.of(ErrorCode.GIVER_PERMISSION, f"the relationship is {state} here")
    elif state == CrossState.REQUESTED:
        await conn.fetchval(_DECLINED_AT_GIVER, row["id"], now)
    elif state == CrossState.ACTIVE:
        error = ErrorBody.of(ErrorCode.VALIDATION, "the relationship was already confirmed")
    # A decline of a relationship already over changes nothing and is taken.
    log.info(
        "cross_relationship_answered",
        relation_id=body.relation_id,
        typ=str(msg.typ),
        outcome="OK" if error is None else "REFUSED",
    )
    return await store_reply(conn, row["id"], msg, reply_to(msg, body.relation_id, error))


async def request_answered(conn: asyncpg.Connection, body: RelReply, now: dt.datetime) -> None:
    """B's REL_REPLY to our REL_REQUEST: delivered, or refused (3204, 5105, ...)."""
    row = await conn.fetchrow(LOCK_SIDE, "giver", body.relation_id)
    if row is None:
        return
    if body.error is None:
        await conn.execute(_DELIVERED, row["id"], now)
        return
    await conn.fetchval(_REFUSED_AT_GIVER, row["id"], int(body.error.code), body.error.text, now)
    log.info("cross_relationship_refused", relation_id=body.relation_id, code=int(body.error.code))
