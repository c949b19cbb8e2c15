"""The rows of a cross-province relationship: types, shared SQL, the stored replies.

`cross_relationship` (migrations/0004) holds one row per `(side, relation_id)`; `CrossRelation`
is what the grants code reads of it, `CrossRelationshipView` what a party sees. Every
message applied from a peer is stored once per (relationship, typ) with the reply given
(`cross_relationship_message`): a duplicate gets the stored reply, another body under the
same key gets 3106 and the differing fields. Also here, shared by the giver side, the
receiver side and the endings: the guarded transition of a party's own row, the audit
event, and the millisecond timestamps of the wire.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Literal

import asyncpg
import msgspec
import structlog

from protocol.errors import ModifiedRequest
from protocol.ids import is_uuid7
from protocol.messages import (
    ErrorBody,
    MessageType,
    RelReply,
    decode_body,
    differing_fields,
    encode_body,
)
from wallet import audit
from wallet.errors import ErrorCode as WalletCode
from wallet.errors import WalletError
from wallet.plt.dispatch import Incoming
from wallet.rules import RelationType

log = structlog.get_logger("wallet.plt.relations")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class CrossState(StrEnum):
    REQUESTED = "requested"  # giver side: filed, waiting for the receiver
    PENDING_CONFIRMATION = "pending_confirmation"  # receiver side: waiting for the receiver
    ACTIVE = "active"
    DECLINED = "declined"
    REFUSED = "refused"  # the receiver's node refused the request (3204, 5105, ...)
    ENDED = "ended"


Side = Literal["giver", "receiver"]
LIVE_STATES = ("requested", "pending_confirmation", "active")


class CrossRelation(msgspec.Struct, frozen=True):
    """One side's row of a cross-province relationship (what the grants code reads).

    Giver side: `person_id` is the giver, `other_ref` the receiver's wallet at B (set by
    REL_CONFIRM; PREPAREs address it). Receiver side: `person_id` is the receiver,
    `other_ref` the giver's account reference at A, `other_name` the giver's masked name.
    """

    id: int
    relation_id: str
    side: Side
    peer_node: str
    person_id: int | None
    other_name: str | None
    other_ref: str | None
    relation_type: str | None
    state: CrossState
    filed_at: dt.datetime
    confirmed_at: dt.datetime | None
    ended_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.state is CrossState.ACTIVE


class Refusal(msgspec.Struct, frozen=True):
    """Why the receiver's node refused the filing: the PLT/1 code and its text."""

    code: int
    text: str


class CrossRelationshipView(msgspec.Struct, frozen=True):
    """A cross-province relationship as one party sees it.

    Only the other party is shown, masked. The receiver's node never learns the giver's ID
    number, so `other_id_number_masked` is null in the receiver's view.
    """

    relation_id: str
    viewer: Side
    relation_type: RelationType | None
    state: CrossState
    other_node: str
    other_province: str | None
    other_name_masked: str | None
    other_id_number_masked: str | None
    evidence_ref: str | None
    refusal: Refusal | None
    filed_at: dt.datetime
    delivered_at: dt.datetime | None
    confirmed_at: dt.datetime | None
    declined_at: dt.datetime | None
    ended_at: dt.datetime | None
    ended_by: str | None
    end_reason: str | None


def giver_account_ref(person_id: int) -> str:
    """The giver's account as A names it to peers (opaque: no ID number leaves A)."""
    return f"p-{person_id}"


def receiver_account_ref(person_id: int) -> str:
    """The receiver's wallet as B names it in REL_CONFIRM; PREPAREs address it."""
    return f"w-{person_id}"


# --- SQL -------------------------------------------------------------------------------------

COLUMNS = """
id, relation_id, side, peer_node, person_id, other_name, other_id_number, other_ref,
other_province, relation_type, evidence_ref, state, request_hash, refusal_code, refusal_text,
filed_at, delivered_at, confirmed_at, declined_at, ended_at, ended_by, end_reason
"""
LOCK_SIDE = (
    f"SELECT {COLUMNS} FROM cross_relationship WHERE side = $1 AND relation_id = $2 FOR UPDATE"
)
_STORED_MESSAGE = """
SELECT body, body_hash, reply FROM cross_relationship_message
WHERE relationship_id = $1 AND typ = $2
"""
_STORE_MESSAGE = """
INSERT INTO cross_relationship_message (relationship_id, typ, body, body_hash, reply, received_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""


def to_ms(instant: dt.datetime) -> int:
    """Milliseconds since the epoch, as the wire carries instants."""
    return (instant - EPOCH) // dt.timedelta(milliseconds=1)


def from_ms(at_ms: int) -> dt.datetime:
    """The instant of a wire timestamp in milliseconds."""
    return EPOCH + dt.timedelta(milliseconds=at_ms)


def relation_from_row(row: asyncpg.Record) -> CrossRelation:
    """A `cross_relationship` row (`COLUMNS`) as the grants code reads it."""
    return CrossRelation(
        id=row["id"],
        relation_id=row["relation_id"],
        side=row["side"],
        peer_node=row["peer_node"],
        person_id=row["person_id"],
        other_name=row["other_name"],
        other_ref=row["other_ref"],
        relation_type=row["relation_type"],
        state=CrossState(row["state"]),
        filed_at=row["filed_at"],
        confirmed_at=row["confirmed_at"],
        ended_at=row["ended_at"],
    )


# --- guarded transitions ------------------------------------------------------------------

# `done` of a confirmation: the receiver confirmed, whatever happened since.
CONFIRMED = "confirmed"


async def guarded_transition(
    conn: asyncpg.Connection,
    statement: str,
    explain: str,
    relation_id: str,
    person_id: int,
    *args: object,
    done: str,
) -> asyncpg.Record | None:
    """Run a guarded transition; None when the row is already where this action leads
    (`done`, a state, or "confirmed": a replay, answered with the current view and nothing
    sent again); on any other miss say whether the row is absent or in another state
    (`explain` finds the row the caller may act on: its state and confirmed_at)."""
    row = await conn.fetchrow(statement, relation_id, person_id, *args)
    if row is not None:
        return row
    found = await conn.fetchrow(explain, relation_id, person_id)
    if found is None:
        raise WalletError(
            WalletCode.NOT_FOUND, f"cross-province relationship {relation_id} does not exist"
        )
    state = found["state"]
    if state == done or (done == CONFIRMED and found["confirmed_at"] is not None):
        return None
    raise WalletError(
        WalletCode.STATE_CONFLICT,
        f"cross-province relationship {relation_id} is {state}; this action is not possible now",
        state=state,
    )


def check_relation_id(relation_id: str) -> None:
    """404 for a relation id that cannot exist (not a UUIDv7), before touching the database."""
    if not is_uuid7(relation_id):
        raise WalletError(
            WalletCode.NOT_FOUND, f"cross-province relationship {relation_id} does not exist"
        )


# --- the message store: one applied message and its reply per (relationship, typ) ------------


def reply_to(msg: Incoming, relation_id: str, error: ErrorBody | None = None) -> RelReply:
    """The REL_REPLY answering `msg`: OK, or REFUSED with `error`."""
    return RelReply(
        relation_id=relation_id,
        ref_typ=msg.typ,
        ref_hash=msg.body_hash,
        outcome="OK" if error is None else "REFUSED",
        error=error,
        replied_at_ms=msg.now_ms,
    )


async def stored_reply(
    conn: asyncpg.Connection, relationship_id: int, msg: Incoming
) -> RelReply | None:
    """The reply already given to this (relationship, typ); 3106 if the body differs."""
    stored = await conn.fetchrow(_STORED_MESSAGE, relationship_id, str(msg.typ))
    if stored is None:
        return None
    if stored["body_hash"] != msg.body_hash:
        old = decode_body(msg.typ, bytes(stored["body"]))
        raise ModifiedRequest(differing_fields(old, msg.body) or ["body"])
    reply = decode_body(MessageType.REL_REPLY, bytes(stored["reply"]))
    assert isinstance(reply, RelReply)
    return reply


async def store_reply(
    conn: asyncpg.Connection, relationship_id: int, msg: Incoming, reply: RelReply
) -> RelReply:
    """Store the applied message with its reply (the dedup record); return the reply."""
    await conn.execute(
        _STORE_MESSAGE,
        relationship_id,
        str(msg.typ),
        encode_body(msg.body),
        msg.body_hash,
        encode_body(reply),
        from_ms(msg.now_ms),
    )
    return reply


async def record_audit(
    conn: asyncpg.Connection,
    now: dt.datetime,
    actor: str,
    action: str,
    relation_id: str,
    **detail: object,
) -> None:
    """The audit event of a change to `cross_relationship:<relation_id>`."""
    await audit.record(
        conn,
        at=now,
        actor=actor,
        action=action,
        subject=f"cross_relationship:{relation_id}",
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        **detail,
    )
