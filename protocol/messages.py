"""PLT/1 message bodies (PROTOCOL b.4), one frozen msgspec Struct per `typ`.

A body travels inside an envelope as `msgspec.msgpack.encode(body, order="deterministic")`.
Decoding is by `typ` through `BODY_TYPES`, and a body whose bytes are not exactly that
canonical encoding is refused: then equal bytes mean equal content, and a body hash
(SHA-256 of the bytes) is a faithful duplicate key (PROTOCOL b.8).

Money is integer fen (`*_fen`), times are ms since the Unix epoch UTC (`*_at_ms`),
durations are ms (`*_ms`), ids are canonical UUIDv7 strings, hashes are lowercase hex.
"""

import hashlib
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from protocol.errors import ErrorClass, ErrorCode, MalformedMessage, ProtocolError
from protocol.ids import UUID7_PATTERN
from protocol.keys import KeySetDocument, NodeId

BATCH_MAX = 256  # items per STATUS_REQ, RELEASE, and envelopes per POST (PROTOCOL b.12)
STATEMENT_BUCKETS = 256
FEN_MAX = 2**63 - 1  # PostgreSQL BIGINT
# The last millisecond of year 9999 UTC: a later time has no date in Python or PostgreSQL.
TIME_MS_MAX = 253_402_300_799_999
# A grant offered for longer than a year is no grant a node makes (RULES 12: until 06:00);
# the bound keeps `received_at + accept_within` a date both ends can store.
ACCEPT_WITHIN_MS_MAX = 366 * 24 * 3600 * 1000
# PostgreSQL's text types cannot hold NUL: a field with one is malformed (3101), refused
# before it reaches a handler, never a failure to apply (2003) that the peer would repeat.
NO_NUL = r"^[^\x00]*$"
# What decoding peer bytes may raise besides DecodeError: bad UTF-8 (ValueError) and
# nesting deeper than the decoder's recursion bound (RecursionError, raised by msgspec
# before the stack is at risk); each means "malformed".
DECODE_ERRORS = (msgspec.DecodeError, ValueError, RecursionError)

Uuid7 = Annotated[str, msgspec.Meta(pattern=UUID7_PATTERN)]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Fen = Annotated[int, msgspec.Meta(ge=0, le=FEN_MAX)]
PositiveFen = Annotated[int, msgspec.Meta(gt=0, le=FEN_MAX)]
TimeMs = Annotated[int, msgspec.Meta(ge=0, le=TIME_MS_MAX)]
DurationMs = Annotated[int, msgspec.Meta(ge=0, le=TIME_MS_MAX)]
WindowId = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}$")]
Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=NO_NUL)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
Text = Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)]
IdNumber = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{17}[0-9X]$")]
Currency = Literal["CNY"]
FinalState = Literal["COMMITTED", "ABORTED"]
# Every state a STATUS reply may name: the giver side's, the receiver side's, or UNKNOWN.
TransferState = Literal[
    "PREPARED_A",
    "COMMITTED",
    "ABORTED",
    "REJECTED",
    "PENDING_ACCEPT",
    "ACCEPTED",
    "DECLINED_PENDING",
    "DECLINED",
    "UNKNOWN",
]


class MessageType(StrEnum):
    """The `typ` of an envelope; decides the body Struct."""

    PREPARE = "PREPARE"
    RECEIVED = "RECEIVED"
    DECLINE = "DECLINE"
    ACCEPT = "ACCEPT"
    DECISION = "DECISION"
    ACK = "ACK"
    STATUS_REQ = "STATUS_REQ"
    STATUS = "STATUS"
    STATEMENT = "STATEMENT"
    KEYSET = "KEYSET"
    REL_REQUEST = "REL_REQUEST"
    REL_REPLY = "REL_REPLY"
    REL_CONFIRM = "REL_CONFIRM"
    REL_DECLINE = "REL_DECLINE"
    REL_END = "REL_END"
    RELEASE = "RELEASE"
    ERROR = "ERROR"
    STATEMENT_DETAIL_REQ = "STATEMENT_DETAIL_REQ"
    STATEMENT_DETAIL = "STATEMENT_DETAIL"
    USAGE = "USAGE"
    RECON_REPLY = "RECON_REPLY"
    QUOTA_USED = "QUOTA_USED"
    NOTICE_ACK = "NOTICE_ACK"


class RelationType(StrEnum):
    """The eight close-relative types of 民法典 art. 1045 (RULES 2)."""

    SPOUSE = "spouse"
    PARENT = "parent"
    CHILD = "child"
    SIBLING = "sibling"
    GRANDPARENT_PATERNAL = "grandparent_paternal"
    GRANDPARENT_MATERNAL = "grandparent_maternal"
    GRANDCHILD_PATERNAL = "grandchild_paternal"
    GRANDCHILD_MATERNAL = "grandchild_maternal"


class Outcome(StrEnum):
    """What the giver node decided."""

    COMMIT = "COMMIT"
    ABORT = "ABORT"


class Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every message body (and of the parts inside one)."""


# --- parts -------------------------------------------------------------------------------


class ErrorBody(Body, frozen=True, kw_only=True):
    """An error as carried in DECLINE, DECISION.reason, ERROR and REL_* messages."""

    code: ErrorCode
    class_: ErrorClass = msgspec.field(name="class")
    text: Text

    @classmethod
    def of(
        cls, code: ErrorCode, text: str | None = None, error_class: ErrorClass | None = None
    ) -> "ErrorBody":
        """An ErrorBody with the code's default class and title unless given."""
        return cls(
            code=code,
            class_=error_class if error_class is not None else code.error_class,
            text=text if text is not None else code.title,
        )

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> "ErrorBody":
        """The wire form of a ProtocolError."""
        return cls(code=exc.code, class_=exc.error_class, text=exc.message[:500])


class GiverRef(Body, frozen=True, kw_only=True):
    """The giver as the receiver's node may see them: no ID number, a masked name."""

    node: NodeId
    account_ref: Ref
    masked_name: Name


class ReceiverRef(Body, frozen=True, kw_only=True):
    """The receiver's wallet at node B (learnt from REL_CONFIRM)."""

    account_id: Ref


class RelationRef(Body, frozen=True, kw_only=True):
    """The filed, confirmed relationship a grant is made under."""

    relation_id: Uuid7
    type: RelationType
    verified_by_A: bool


class DeviceProof(Body, frozen=True, kw_only=True):
    """A person's device signature over exactly what they authorised (`protocol.device_auth`).

    `signed` are the bytes the device signed (the domain prefix and the canonical JSON
    instruction); `public_key` is the SEC1 uncompressed point the device registered, `kid`
    its digest, `sig` the DER signature. Anyone can verify it offline; the node's envelope
    signature attests that this key is the person's registered device.
    """

    kid: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
    alg: Literal["ES256"]
    public_key: Annotated[bytes, msgspec.Meta(max_length=256)]
    sig: Annotated[bytes, msgspec.Meta(max_length=256)]
    signed: Annotated[bytes, msgspec.Meta(max_length=2048)]


# omit_defaults: a `pin` record encodes exactly as before the device path existed, so stored
# and in-flight bodies stay canonical.
class UserAuth(Body, frozen=True, kw_only=True, omit_defaults=True):
    """How the giver authorised the grant (RULES 12): a device signature (`device`, the main
    path, the proof travels so B can check it) or A's record of a payment-password check
    (`pin`, counters and guardians)."""

    method: Literal["pin", "device"]
    verified_at_ms: TimeMs
    ref: Ref
    device: DeviceProof | None = None


class Acceptance(Body, frozen=True, kw_only=True, omit_defaults=True):
    """How the receiver (or the relative confirming a filing) confirmed on node B; with
    `method: "device"` the receiver's signed acceptance travels in `device`."""

    method: Literal["face", "pin", "device"]
    ref: Ref
    device: DeviceProof | None = None


# --- transfer messages -------------------------------------------------------------------


class Prepare(Body, frozen=True, kw_only=True):
    """A→B: hold a quota grant for the receiver until A decides."""

    transfer_id: Uuid7
    giver: GiverRef
    receiver: ReceiverRef
    relation: RelationRef
    amount_fen: PositiveFen
    currency: Currency
    fee_fen: Fen
    accept_within_ms: Annotated[int, msgspec.Meta(gt=0, le=ACCEPT_WITHIN_MS_MAX)]
    window_id: WindowId
    user_auth: UserAuth
    a_hold_id: Uuid7


class Received(Body, frozen=True, kw_only=True):
    """B→A, synchronous reply to PREPARE: B holds the quota, pending the receiver's answer."""

    transfer_id: Uuid7
    prepare_hash: Sha256Hex
    b_hold_id: Uuid7
    b_received_at_ms: TimeMs


class Decline(Body, frozen=True, kw_only=True):
    """B→A: B refuses the grant (synchronous validation failure, or the receiver refuses)."""

    transfer_id: Uuid7
    prepare_hash: Sha256Hex
    error: ErrorBody


class Accept(Body, frozen=True, kw_only=True):
    """B→A: the receiver accepted. Binding: B posts if A commits."""

    transfer_id: Uuid7
    prepare_hash: Sha256Hex
    b_hold_id: Uuid7
    accepted_at_ms: TimeMs
    acceptance: Acceptance


class Decision(Body, frozen=True, kw_only=True):
    """A→B: the outcome. `vote_hash` is the SHA-256 of the vote it answers (required for COMMIT)."""

    transfer_id: Uuid7
    prepare_hash: Sha256Hex
    vote_hash: Sha256Hex | None
    outcome: Outcome
    reason: ErrorBody | None
    decided_at_ms: TimeMs
    window_id: WindowId

    def __post_init__(self) -> None:
        if self.outcome is Outcome.COMMIT and (self.vote_hash is None or self.reason is not None):
            raise ValueError("a COMMIT carries the ACCEPT's vote_hash and no reason")
        if self.outcome is Outcome.ABORT and self.reason is None:
            raise ValueError("an ABORT carries a reason")


class Ack(Body, frozen=True, kw_only=True):
    """B→A, reply to DECISION: B applied it."""

    transfer_id: Uuid7
    decision_hash: Sha256Hex
    final_state: FinalState
    completed_at_ms: TimeMs


class StatusReq(Body, frozen=True, kw_only=True):
    """Either way: what is the state of these transfers?"""

    transfer_ids: Annotated[tuple[Uuid7, ...], msgspec.Meta(min_length=1, max_length=BATCH_MAX)]


class StatusItem(Body, frozen=True, kw_only=True):
    """One transfer in a STATUS reply.

    `decision` is the stored signed DECISION envelope (msgpack or JSON bytes) when there is
    one. `presumed` marks A's answer for an id it has no row for: ABORT by presumption,
    unsigned as a decision (PROTOCOL b.9.4).
    """

    transfer_id: Uuid7
    state: TransferState
    decision: bytes | None = None
    undecided_remaining_ms: DurationMs | None = None
    presumed: bool = False


class Status(Body, frozen=True, kw_only=True):
    """Reply to STATUS_REQ, one item per requested id, in the same order."""

    items: Annotated[tuple[StatusItem, ...], msgspec.Meta(max_length=BATCH_MAX)]


class Statement(Body, frozen=True, kw_only=True):
    """Both ways, per window: committed count and sums, and hashes over every decided id."""

    window_id: WindowId
    count: Annotated[int, msgspec.Meta(ge=0)]
    sum_by_currency: dict[Currency, Fen]
    ids_hash: Sha256Hex
    bucket_hashes: Annotated[
        tuple[Sha256Hex, ...],
        msgspec.Meta(min_length=STATEMENT_BUCKETS, max_length=STATEMENT_BUCKETS),
    ]


class KeySetPush(Body, frozen=True, kw_only=True):
    """A node's new KEYSET document, pushed after a rotation (peers may also fetch it)."""

    document: KeySetDocument


class ErrorReply(Body, frozen=True, kw_only=True):
    """A signed error reply when no typed reply fits (malformed, bad signature, 3106, 3208)."""

    ref_typ: MessageType | None
    ref_hash: Sha256Hex | None
    transfer_id: Uuid7 | None
    error: ErrorBody
    differs: Annotated[tuple[Text, ...], msgspec.Meta(max_length=64)] = ()


# --- relationship messages ---------------------------------------------------------------


class RelReceiver(Body, frozen=True, kw_only=True):
    """The relative as filed by the giver; B finds them in its roster by ID number."""

    id_number: IdNumber
    name: Name


class RelRequest(Body, frozen=True, kw_only=True):
    """A→B: the giver filed a relationship; ask the receiver to confirm (RULES 5)."""

    relation_id: Uuid7
    giver: GiverRef
    receiver: RelReceiver
    relation_type: RelationType
    evidence_ref: Ref
    filed_at_ms: TimeMs


class RelReply(Body, frozen=True, kw_only=True):
    """Signed reply to any relationship message and to RELEASE: taken (OK) or refused."""

    relation_id: Uuid7
    ref_typ: MessageType
    ref_hash: Sha256Hex
    outcome: Literal["OK", "REFUSED"]
    error: ErrorBody | None
    replied_at_ms: TimeMs

    def __post_init__(self) -> None:
        if (self.outcome == "REFUSED") != (self.error is not None):
            raise ValueError("a REFUSED reply carries an error, an OK reply none")


class RelConfirm(Body, frozen=True, kw_only=True):
    """B→A: the receiver confirmed; names the wallet later PREPAREs address."""

    relation_id: Uuid7
    request_hash: Sha256Hex
    receiver_account_id: Ref
    confirmed_at_ms: TimeMs
    acceptance: Acceptance


class RelDecline(Body, frozen=True, kw_only=True):
    """B→A: the receiver (or B's checks) refused the filing."""

    relation_id: Uuid7
    request_hash: Sha256Hex
    error: ErrorBody
    declined_at_ms: TimeMs


class RelEnd(Body, frozen=True, kw_only=True):
    """Either way: the relationship ended (RULES 6); no new grant under it."""

    relation_id: Uuid7
    ended_by: Literal["giver", "receiver", "system"]
    reason: Text
    ended_at_ms: TimeMs


class ReleasedGrant(Body, frozen=True, kw_only=True):
    """One committed grant closed by B: `released_fen = granted_fen - used_fen` goes back."""

    transfer_id: Uuid7
    granted_fen: PositiveFen
    used_fen: Fen
    released_fen: Fen

    def __post_init__(self) -> None:
        if (
            self.used_fen > self.granted_fen
            or self.released_fen != self.granted_fen - self.used_fen
        ):
            raise ValueError("released_fen must equal granted_fen - used_fen")


class Release(Body, frozen=True, kw_only=True):
    """B→A after B closed the quotas (durably, first): return the unused part to the giver."""

    release_id: Uuid7
    relation_id: Uuid7
    grants: Annotated[tuple[ReleasedGrant, ...], msgspec.Meta(min_length=1, max_length=BATCH_MAX)]
    closed_at_ms: TimeMs

    def __post_init__(self) -> None:
        ids = [g.transfer_id for g in self.grants]
        if len(set(ids)) != len(ids):
            raise ValueError("a grant is listed twice")


# --- reconciliation and clearing (PROTOCOL b.10, RULES 16) --------------------------------

Month = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")]
Bucket = Annotated[int, msgspec.Meta(ge=0, lt=STATEMENT_BUCKETS)]
USAGE_LINES_MAX = 4_096  # grants per USAGE part (about 0.4 MB of msgpack)


class StatementLine(Body, frozen=True, kw_only=True):
    """One decided transfer of a window as the sending node books it (drill-down).

    `giver` is the node that coordinated (and stamped) the transfer; `amount_fen` is 0 for an
    ABORT (a receiver-side tombstone never learnt the amount), as in the statement hashes.
    """

    transfer_id: Uuid7
    giver: NodeId
    amount_fen: Fen
    outcome: Outcome


class StatementDetailReq(Body, frozen=True, kw_only=True):
    """Either way: the decided transfers of a closed window in these buckets, please."""

    window_id: WindowId
    buckets: Annotated[tuple[Bucket, ...], msgspec.Meta(min_length=1, max_length=STATEMENT_BUCKETS)]

    def __post_init__(self) -> None:
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be ascending and distinct")


class StatementDetail(Body, frozen=True, kw_only=True):
    """Reply to STATEMENT_DETAIL_REQ: the lines of those buckets, sorted by transfer_id.

    `ids_hash` is the sender's *current* hash over the whole window (a statement, once sent,
    never changes; rows that arrived later show here).
    """

    window_id: WindowId
    buckets: tuple[Bucket, ...]
    lines: tuple[StatementLine, ...]
    ids_hash: Sha256Hex


class UsageLine(Body, frozen=True, kw_only=True):
    """One grant in a monthly USAGE: what the receiver's province spent of it in the month.

    `used_fen` is settlements minus refunds booked in the month (negative when refunds of
    earlier spending exceed it); `used_total_fen` is the same through the month's end;
    `released_fen` what B has released of the grant so far (RELEASE, cumulative).
    """

    transfer_id: Uuid7
    granted_fen: PositiveFen
    used_fen: Annotated[int, msgspec.Meta(ge=-FEN_MAX, le=FEN_MAX)]
    used_total_fen: Fen
    released_fen: Fen

    def __post_init__(self) -> None:
        if self.used_total_fen > self.granted_fen or self.released_fen > self.granted_fen:
            raise ValueError("used_total_fen and released_fen are at most granted_fen")
        if self.used_fen > self.used_total_fen:
            raise ValueError("used_fen exceeds used_total_fen")


class Usage(Body, frozen=True, kw_only=True):
    """B→A after B cleared a month (RULES 16): per-grant usage of A's grants, in parts."""

    month: Month
    part: Annotated[int, msgspec.Meta(ge=1)]
    parts: Annotated[int, msgspec.Meta(ge=1)]
    lines: Annotated[tuple[UsageLine, ...], msgspec.Meta(max_length=USAGE_LINES_MAX)]
    used_fen: Annotated[int, msgspec.Meta(ge=-FEN_MAX, le=FEN_MAX)]
    cleared_at_ms: TimeMs

    def __post_init__(self) -> None:
        if self.part > self.parts:
            raise ValueError("part exceeds parts")
        ids = [line.transfer_id for line in self.lines]
        if ids != sorted(set(ids)):
            raise ValueError("lines must be sorted by transfer_id, each grant once")
        if self.used_fen != sum(line.used_fen for line in self.lines):
            raise ValueError("used_fen must be the sum of the lines")


class ReconReply(Body, frozen=True, kw_only=True):
    """Signed reply to STATEMENT (about a window) and USAGE (about a month).

    STATEMENT: MATCH (equal to ours), MISMATCH (`buckets` differ), PENDING (ours is not
    built yet). USAGE: BOOKED, with `booked_fen` the payable booked for this part.
    """

    ref_typ: MessageType
    ref_hash: Sha256Hex
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=NO_NUL)]
    outcome: Literal["MATCH", "MISMATCH", "PENDING", "BOOKED"]
    buckets: Annotated[tuple[Bucket, ...], msgspec.Meta(max_length=STATEMENT_BUCKETS)] = ()
    booked_fen: Annotated[int, msgspec.Meta(ge=-FEN_MAX, le=FEN_MAX)] = 0
    replied_at_ms: TimeMs


class QuotaUsed(Body, frozen=True, kw_only=True):
    """B→A, informational: the receiver spent part of A's grant (`spent`), or an institution
    refunded such a payment to the quota (`refunded`). One per grant a settlement or refund
    drew on, sent in that settlement's or refund's own transaction, so A's app can tell the
    giver at once. It never moves money: the monthly USAGE stays the source of truth.

    `settlement_ref` is B's id of the settlement, `refund_ref` B's id of the refund (only for
    `refunded`); `category` the settlement's category; `used_total_fen` what the receiver has
    used of the grant so far, net of refunds, this event included.
    """

    notice_id: Uuid7
    transfer_id: Uuid7
    relation_id: Uuid7
    kind: Literal["spent", "refunded"]
    settlement_ref: Ref
    refund_ref: Ref | None
    amount_fen: PositiveFen
    category: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}$")]
    used_total_fen: Fen
    at_ms: TimeMs

    def __post_init__(self) -> None:
        if (self.kind == "refunded") != (self.refund_ref is not None):
            raise ValueError("refund_ref is given exactly for a refund")


class NoticeAck(Body, frozen=True, kw_only=True):
    """A→B, the signed reply to QUOTA_USED: the giver was told (or had been already)."""

    notice_id: Uuid7
    transfer_id: Uuid7


# --- registry and helpers ------------------------------------------------------------------

BODY_TYPES: dict[MessageType, type[Body]] = {
    MessageType.PREPARE: Prepare,
    MessageType.RECEIVED: Received,
    MessageType.DECLINE: Decline,
    MessageType.ACCEPT: Accept,
    MessageType.DECISION: Decision,
    MessageType.ACK: Ack,
    MessageType.STATUS_REQ: StatusReq,
    MessageType.STATUS: Status,
    MessageType.STATEMENT: Statement,
    MessageType.KEYSET: KeySetPush,
    MessageType.REL_REQUEST: RelRequest,
    MessageType.REL_REPLY: RelReply,
    MessageType.REL_CONFIRM: RelConfirm,
    MessageType.REL_DECLINE: RelDecline,
    MessageType.REL_END: RelEnd,
    MessageType.RELEASE: Release,
    MessageType.ERROR: ErrorReply,
    MessageType.STATEMENT_DETAIL_REQ: StatementDetailReq,
    MessageType.STATEMENT_DETAIL: StatementDetail,
    MessageType.USAGE: Usage,
    MessageType.RECON_REPLY: ReconReply,
    MessageType.QUOTA_USED: QuotaUsed,
    MessageType.NOTICE_ACK: NoticeAck,
}
_TYP_OF: dict[type[Body], MessageType] = {cls: typ for typ, cls in BODY_TYPES.items()}
_DECODERS = {typ: msgspec.msgpack.Decoder(cls) for typ, cls in BODY_TYPES.items()}
_ENCODER = msgspec.msgpack.Encoder(order="deterministic")


def typ_of(body: Body) -> MessageType:
    """The envelope `typ` of a body Struct."""
    try:
        return _TYP_OF[type(body)]
    except KeyError:
        raise TypeError(f"{type(body).__name__} is not a message body") from None


def encode_body(body: Body) -> bytes:
    """The canonical body bytes: deterministic msgpack."""
    return _ENCODER.encode(body)


def decode_body(typ: MessageType, raw: bytes) -> Body:
    """Decode `raw` as the body of `typ`; MalformedMessage unless it is canonical and valid."""
    decoder = _DECODERS.get(typ)
    if decoder is None:
        raise MalformedMessage(f"unknown typ {typ!r}")
    try:
        body: Body = decoder.decode(raw)
    except DECODE_ERRORS as exc:
        raise MalformedMessage(f"{typ} body: {exc or 'nested too deeply'}") from None
    if _ENCODER.encode(body) != raw:
        raise MalformedMessage(f"{typ} body is not in canonical (deterministic msgpack) encoding")
    return body


def body_hash(raw: bytes) -> str:
    """SHA-256 of body bytes, lowercase hex (prepare_hash, vote_hash, decision_hash, ...)."""
    return hashlib.sha256(raw).hexdigest()


def hash_body(body: Body) -> str:
    """`body_hash(encode_body(body))`."""
    return body_hash(_ENCODER.encode(body))


def differing_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two bodies (for 3106 `differs`).

    Nested Structs of the same type are compared field by field; anything else as a whole.
    Bodies of different types differ in `typ`.
    """
    if type(old) is not type(new):
        return [prefix.rstrip(".") or "typ"]
    out: list[str] = []
    for name in old.__struct_fields__:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            out.extend(differing_fields(a, b, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


# --- statements (PROTOCOL b.10) ----------------------------------------------------------


class StatementEntry(msgspec.Struct, frozen=True):
    """One decided transfer of a window, as both sides book it."""

    transfer_id: str
    amount_fen: int
    currency: str
    outcome: Outcome


def statement_bucket(transfer_id: str) -> int:
    """Bucket 0..255 of a transfer: its last byte, which is random in a UUIDv7.

    (PROTOCOL b.10 says the first byte; in a UUIDv7 that is time and would put a whole
    window into one bucket.)
    """
    return int(transfer_id[-2:], 16)


def _entries_hash(entries: Iterable[StatementEntry]) -> str:
    digest = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.transfer_id):
        digest.update(f"{e.transfer_id}|{e.amount_fen}|{e.outcome}\n".encode())
    return digest.hexdigest()


def build_statement(window_id: str, entries: Iterable[StatementEntry]) -> Statement:
    """The STATEMENT of a window.

    `count` and `sum_by_currency` cover committed transfers; `ids_hash` and each bucket hash
    are SHA-256 over the lines `transfer_id|amount_fen|outcome\\n` of every decided transfer,
    sorted by transfer_id.
    """
    items = list(entries)
    buckets: list[list[StatementEntry]] = [[] for _ in range(STATEMENT_BUCKETS)]
    sums: dict[Currency, int] = {}
    count = 0
    for e in items:
        buckets[statement_bucket(e.transfer_id)].append(e)
        if e.outcome is Outcome.COMMIT:
            count += 1
            if e.currency != "CNY":
                raise ValueError(f"unsupported currency {e.currency!r}")
            sums["CNY"] = sums.get("CNY", 0) + e.amount_fen
    return Statement(
        window_id=window_id,
        count=count,
        sum_by_currency=sums,
        ids_hash=_entries_hash(items),
        bucket_hashes=tuple(_entries_hash(b) for b in buckets),
    )


def differing_buckets(ours: Statement, theirs: Statement) -> list[int]:
    """Buckets whose hashes differ: drill down there with per-id STATUS."""
    return [
        i
        for i, (a, b) in enumerate(zip(ours.bucket_hashes, theirs.bucket_hashes, strict=True))
        if a != b
    ]


def statement_line_hash(lines: Iterable[StatementLine]) -> str:
    """`ids_hash` over drill-down lines: the same lines as `build_statement` hashes."""
    return _entries_hash(
        StatementEntry(line.transfer_id, line.amount_fen, "CNY", line.outcome) for line in lines
    )
