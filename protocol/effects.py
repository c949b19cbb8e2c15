"""Effects returned by the giver and receiver state machines.

A state machine step returns a new state and a tuple of effects. The caller (the wallet
layer) executes all of them, and writes the new state, in ONE local database transaction;
if any of them cannot be done (a guarded UPDATE finds 0 rows) it rolls back the whole step.

Ledger effects mean different postings on each side (PROTOCOL b.1):

    HoldGiver   A: pending debit of the giver's personal account, pending credit of due_to:B
    HoldQuota   B: pending debit of due_from:A, pending credit of the receiver's quota
    PostHold    post this transfer's hold (both legs), on whichever side steps
    VoidHold    void this transfer's hold (both legs)

Messaging effects:

    Send        insert an outbox row, keyed (transfer_id, typ): sent and retried by a worker
    Reply       the synchronous answer to the message being processed. When that message
                was itself a reply (RECEIVED or DECLINE answering PREPARE, a DECISION
                answering ACCEPT, a STATUS), there is nobody to answer: drop it.
    StopRetries mark the outbox row (transfer_id, typ) done
"""

from enum import StrEnum

import msgspec

from protocol.errors import ErrorCode
from protocol.messages import Body, Decision, ErrorBody, ErrorReply, MessageType, TransferState


class AlertKind(StrEnum):
    """Why a human should look. Everything but IN_DOUBT means a bug or an attack."""

    MODIFIED_REQUEST = "MODIFIED_REQUEST"  # same id, other body (3106)
    UNKNOWN_TRANSFER = "UNKNOWN_TRANSFER"  # a vote or ACK for an id we never prepared
    UNKNOWN_COMMIT = "UNKNOWN_COMMIT"  # a COMMIT without a matching ACCEPT (3208)
    EQUIVOCATION = "EQUIVOCATION"  # the giver node signed COMMIT and ABORT for one id
    DECISION_MISMATCH = "DECISION_MISMATCH"  # two different decisions with the same outcome
    PRESUMED_ABORT = "PRESUMED_ABORT"  # A asked about an id it has no row for (P1)
    PEER_LOST_COMMIT = "PEER_LOST_COMMIT"  # A presumes ABORT where we hold its signed COMMIT
    REPAIRED = "REPAIRED"  # A re-applied a COMMIT from its own signed evidence
    IN_DOUBT = "IN_DOUBT"  # a hold has waited for a decision too long (page)


class Effect(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every effect."""


class HoldGiver(Effect, frozen=True, kw_only=True):
    """A: hold `amount_fen` of the giver (guarded UPDATE; 0 rows means step again with 4000)."""

    amount_fen: int


class HoldQuota(Effect, frozen=True, kw_only=True):
    """B: pending, unspendable quota for the receiver, pending debit of due_from:A."""

    amount_fen: int


class PostHold(Effect, frozen=True, kw_only=True):
    """Post this transfer's hold: the grant becomes final on this side."""

    amount_fen: int


class VoidHold(Effect, frozen=True, kw_only=True):
    """Void this transfer's hold: the amount is free again on this side."""

    amount_fen: int


class Send(Effect, frozen=True, kw_only=True):
    """Queue `body` as a request of `typ` to `to_node` in the outbox."""

    typ: MessageType
    to_node: str
    body: Body


class Reply(Effect, frozen=True, kw_only=True):
    """Answer the message being processed with `body` of `typ`."""

    typ: MessageType
    body: Body


class StopRetries(Effect, frozen=True, kw_only=True):
    """The outbox row (transfer_id, typ) needs no more attempts."""

    typ: MessageType


class StoreEvidence(Effect, frozen=True, kw_only=True):
    """Keep the received envelope bytes of this message forever (it is signed evidence)."""

    typ: MessageType
    body_hash: str


class Alert(Effect, frozen=True, kw_only=True):
    """Raise an operator alert."""

    kind: AlertKind
    detail: str


class FreezePeer(Effect, frozen=True, kw_only=True):
    """Stop exchanging transfers with `node` until a human lifts it (equivocation)."""

    node: str


class NotifyReceiver(Effect, frozen=True, kw_only=True):
    """Tell the receiver's app: a grant is offered, became spendable, or was returned."""

    kind: str


class NotifyGiver(Effect, frozen=True, kw_only=True):
    """Tell the giver's app the grant's outcome."""

    state: str


class QueryPeer(Effect, frozen=True, kw_only=True):
    """Ask `to_node` for the state of this transfer (the resolver batches these into STATUS_REQ)."""

    to_node: str
    transfer_id: str


class ReportStatus(Effect, frozen=True, kw_only=True):
    """One item of a STATUS reply; the caller attaches the stored signed DECISION envelope."""

    transfer_id: str
    state: TransferState
    decision: Decision | None = None
    undecided_remaining_ms: int | None = None
    presumed: bool = False


def error_reply(
    ref_typ: MessageType | None,
    ref_hash: str | None,
    transfer_id: str | None,
    code: ErrorCode,
    text: str | None = None,
    differs: tuple[str, ...] = (),
) -> Reply:
    """A Reply carrying a signed ERROR body about the message being processed."""
    return Reply(
        typ=MessageType.ERROR,
        body=ErrorReply(
            ref_typ=ref_typ,
            ref_hash=ref_hash,
            transfer_id=transfer_id,
            error=ErrorBody.of(code, text),
            differs=differs,
        ),
    )
