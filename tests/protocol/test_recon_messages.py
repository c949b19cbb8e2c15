"""The reconciliation and clearing bodies (STATEMENT_DETAIL_REQ, STATEMENT_DETAIL, USAGE,
RECON_REPLY): canonical round trips, the rules each body holds, and the DECISION layout the
database relies on to read a decision's window."""

from __future__ import annotations

import msgspec
import pytest

from protocol.errors import ErrorCode, MalformedMessage
from protocol.ids import uuid7
from protocol.messages import (
    STATEMENT_BUCKETS,
    USAGE_LINES_MAX,
    Decision,
    ErrorBody,
    MessageType,
    Outcome,
    ReconReply,
    StatementDetail,
    StatementDetailReq,
    StatementEntry,
    StatementLine,
    Usage,
    UsageLine,
    build_statement,
    decode_body,
    encode_body,
    statement_line_hash,
    typ_of,
)

T0 = 1_773_626_400_000  # 2026-03-16T10:00+08:00


def line(used_fen: int = 30_000, total: int = 30_000, released: int = 0) -> UsageLine:
    return UsageLine(
        transfer_id=uuid7(T0),
        granted_fen=100_000,
        used_fen=used_fen,
        used_total_fen=total,
        released_fen=released,
    )


@pytest.mark.parametrize(
    "body",
    [
        StatementDetailReq(window_id="2026-03-16T10", buckets=(0, 7, 255)),
        StatementDetail(
            window_id="2026-03-16T10",
            buckets=(7,),
            lines=(
                StatementLine(
                    transfer_id=uuid7(T0), giver="prov-13", amount_fen=5, outcome=Outcome.COMMIT
                ),
            ),
            ids_hash="0" * 64,
        ),
        Usage(
            month="2026-03",
            part=1,
            parts=2,
            lines=(line(),),
            used_fen=30_000,
            cleared_at_ms=T0,
        ),
        ReconReply(
            ref_typ=MessageType.USAGE,
            ref_hash="a" * 64,
            subject="2026-03/1",
            outcome="BOOKED",
            booked_fen=-5_000,
            replied_at_ms=T0,
        ),
    ],
)
def test_new_bodies_round_trip_canonically(body: msgspec.Struct) -> None:
    raw = encode_body(body)  # type: ignore[arg-type]
    assert decode_body(typ_of(body), raw) == body  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        decode_body(typ_of(body), msgspec.msgpack.encode(msgspec.to_builtins(body)) + b"\x00")  # type: ignore[arg-type]


def test_usage_lines_hold_their_arithmetic() -> None:
    assert line(used_fen=-5_000, total=25_000).used_fen == -5_000  # refunds beat spending
    with pytest.raises(ValueError, match="at most granted_fen"):
        line(total=100_001)
    with pytest.raises(ValueError, match="used_fen exceeds"):
        line(used_fen=40_000, total=30_000)
    a, b = sorted([line(), line()], key=lambda x: x.transfer_id)
    with pytest.raises(ValueError, match="sum of the lines"):
        Usage(month="2026-03", part=1, parts=1, lines=(a, b), used_fen=1, cleared_at_ms=T0)
    with pytest.raises(ValueError, match="sorted"):
        Usage(month="2026-03", part=1, parts=1, lines=(b, a), used_fen=60_000, cleared_at_ms=T0)
    with pytest.raises(ValueError, match="part exceeds"):
        Usage(month="2026-03", part=3, parts=2, lines=(), used_fen=0, cleared_at_ms=T0)


def test_bad_fields_are_malformed_on_the_wire() -> None:
    good = Usage(month="2026-03", part=1, parts=1, lines=(), used_fen=0, cleared_at_ms=T0)
    raw = msgspec.msgpack.encode({**msgspec.to_builtins(good), "month": "2026-13"})
    with pytest.raises(MalformedMessage):
        decode_body(MessageType.USAGE, raw)
    request = {"window_id": "2026-03-16T10", "buckets": [3, 1]}
    with pytest.raises(MalformedMessage, match="ascending"):
        decode_body(MessageType.STATEMENT_DETAIL_REQ, msgspec.msgpack.encode(request))
    request = {"window_id": "2026-03-16T10", "buckets": [STATEMENT_BUCKETS]}
    with pytest.raises(MalformedMessage):
        decode_body(MessageType.STATEMENT_DETAIL_REQ, msgspec.msgpack.encode(request))
    too_many = [msgspec.to_builtins(line(total=30_000))] * (USAGE_LINES_MAX + 1)
    raw = msgspec.msgpack.encode({**msgspec.to_builtins(good), "lines": too_many})
    with pytest.raises(MalformedMessage):
        decode_body(MessageType.USAGE, raw)


def test_drill_down_lines_hash_like_the_statement() -> None:
    ids = sorted(uuid7(T0) for _ in range(20))
    entries = [
        StatementEntry(
            tid,
            0 if i % 3 == 0 else 1_000 * i,
            "CNY",
            Outcome.ABORT if i % 3 == 0 else Outcome.COMMIT,
        )
        for i, tid in enumerate(ids)
    ]
    lines = [
        StatementLine(
            transfer_id=e.transfer_id, giver="prov-13", amount_fen=e.amount_fen, outcome=e.outcome
        )
        for e in entries
    ]
    assert statement_line_hash(lines) == build_statement("2026-03-16T10", entries).ids_hash
    assert statement_line_hash(reversed(lines)) == statement_line_hash(lines)


@pytest.mark.parametrize("outcome", [Outcome.COMMIT, Outcome.ABORT])
def test_a_decision_ends_with_its_window_as_the_database_reads_it(outcome: Outcome) -> None:
    # migrations/0006: decision_window_of() reads 0xad + 13 bytes at the end of the body.
    decision = Decision(
        transfer_id=uuid7(T0),
        prepare_hash="a" * 64,
        vote_hash="b" * 64 if outcome is Outcome.COMMIT else None,
        outcome=outcome,
        reason=None if outcome is Outcome.COMMIT else ErrorBody.of(ErrorCode.EXPIRED),
        decided_at_ms=T0,
        window_id="2026-03-16T10",
    )
    raw = encode_body(decision)
    assert raw[-14:] == b"\xad" + b"2026-03-16T10"
