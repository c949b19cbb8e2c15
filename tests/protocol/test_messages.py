"""Message bodies (PROTOCOL b.4): registry, canonical bytes, validation, 3106 diffs, statements."""

import msgspec
import pytest

from protocol.errors import ErrorClass, ErrorCode, MalformedMessage, ModifiedRequest
from protocol.messages import (
    BODY_TYPES,
    Decision,
    ErrorBody,
    MessageType,
    Outcome,
    RelationType,
    Release,
    ReleasedGrant,
    RelReply,
    StatementEntry,
    body_hash,
    build_statement,
    decode_body,
    differing_buckets,
    differing_fields,
    encode_body,
    hash_body,
    statement_bucket,
    typ_of,
)
from tests.protocol.factories import T0_MS, fixed_id, make_decision, make_prepare, replace

PREPARE = make_prepare()


def test_every_message_type_has_exactly_one_body_struct() -> None:
    assert set(BODY_TYPES) == set(MessageType)
    assert len(set(BODY_TYPES.values())) == len(MessageType)
    for typ, cls in BODY_TYPES.items():
        assert cls.__struct_config__.frozen and cls.__struct_config__.forbid_unknown_fields, typ


def test_the_eight_close_relative_types() -> None:
    assert [t.value for t in RelationType] == [
        "spouse", "parent", "child", "sibling",
        "grandparent_paternal", "grandparent_maternal", "grandchild_paternal", "grandchild_maternal",
    ]  # fmt: skip


def test_body_round_trips_through_its_typ() -> None:
    raw = encode_body(PREPARE)
    assert decode_body(typ_of(PREPARE), raw) == PREPARE
    assert hash_body(PREPARE) == body_hash(raw) and len(body_hash(raw)) == 64


def test_encoding_is_deterministic_across_equal_bodies() -> None:
    assert encode_body(make_prepare()) == encode_body(make_prepare())


def test_body_with_keys_in_another_order_is_not_canonical_and_is_refused() -> None:
    as_map = msgspec.msgpack.decode(encode_body(PREPARE))
    reordered = msgspec.msgpack.encode(dict(reversed(list(as_map.items()))))
    with pytest.raises(MalformedMessage, match="canonical"):
        decode_body(MessageType.PREPARE, reordered)


def test_body_with_an_unknown_field_is_malformed_and_names_it() -> None:
    as_map = msgspec.msgpack.decode(encode_body(PREPARE))
    as_map["bonus_fen"] = 1
    with pytest.raises(MalformedMessage, match="bonus_fen"):
        decode_body(MessageType.PREPARE, msgspec.msgpack.encode(as_map))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount_fen", 0),
        ("amount_fen", -1),
        ("amount_fen", 1.5),
        ("currency", "USD"),
        ("transfer_id", "01234567-89ab-4def-8123-456789abcdef"),  # a v4 UUID
        ("transfer_id", fixed_id(1).upper()),
        ("fee_fen", -5),
    ],
)
def test_invalid_field_values_are_malformed(field: str, value: object) -> None:
    as_map = msgspec.msgpack.decode(encode_body(PREPARE))
    as_map[field] = value
    with pytest.raises(MalformedMessage, match=field):
        decode_body(MessageType.PREPARE, msgspec.msgpack.encode(as_map))


def test_no_single_bit_flip_of_a_body_decodes_to_the_same_body() -> None:
    raw = encode_body(PREPARE)
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        try:
            body = decode_body(MessageType.PREPARE, bytes(flipped))
        except MalformedMessage:
            continue
        assert body != PREPARE


def test_commit_decision_needs_a_vote_hash_and_no_reason() -> None:
    with pytest.raises(ValueError):
        make_decision(PREPARE, Outcome.COMMIT, vote_hash=None)
    with pytest.raises(ValueError):
        make_decision(
            PREPARE, Outcome.COMMIT, vote_hash="a" * 64, reason=ErrorBody.of(ErrorCode.EXPIRED)
        )


def test_abort_decision_needs_a_reason() -> None:
    with pytest.raises(ValueError):
        make_decision(PREPARE, Outcome.ABORT)


def test_decision_rules_hold_when_decoding_too() -> None:
    commit = make_decision(PREPARE, Outcome.COMMIT, vote_hash="a" * 64)
    as_map = msgspec.msgpack.decode(encode_body(commit))
    as_map["vote_hash"] = None
    with pytest.raises(MalformedMessage):
        decode_body(MessageType.DECISION, msgspec.msgpack.encode(as_map))
    assert isinstance(decode_body(MessageType.DECISION, encode_body(commit)), Decision)


def test_error_body_carries_class_under_the_wire_name_class() -> None:
    error = ErrorBody.of(ErrorCode.EXPOSURE_CAP)
    assert msgspec.msgpack.decode(encode_body(error)) == {
        "code": 4001,
        "class": "T",
        "text": "node exposure cap reached",
    }


def test_error_body_from_an_exception() -> None:
    error = ErrorBody.from_exception(ModifiedRequest(["amount_fen"]))
    assert (error.code, error.class_) == (ErrorCode.MODIFIED_REQUEST, ErrorClass.F)


def test_released_amount_must_be_granted_minus_used() -> None:
    ReleasedGrant(transfer_id=fixed_id(1), granted_fen=10_000, used_fen=2_500, released_fen=7_500)
    with pytest.raises(ValueError):
        ReleasedGrant(
            transfer_id=fixed_id(1), granted_fen=10_000, used_fen=2_500, released_fen=7_501
        )


def test_release_lists_each_grant_once() -> None:
    grant = ReleasedGrant(transfer_id=fixed_id(1), granted_fen=100, used_fen=0, released_fen=100)
    with pytest.raises(ValueError):
        Release(
            release_id=fixed_id(2),
            relation_id=fixed_id(3),
            grants=(grant, grant),
            closed_at_ms=T0_MS,
        )


def test_refused_relationship_reply_carries_an_error_and_ok_none() -> None:
    with pytest.raises(ValueError):
        RelReply(
            relation_id=fixed_id(3),
            ref_typ=MessageType.REL_REQUEST,
            ref_hash="a" * 64,
            outcome="REFUSED",
            error=None,
            replied_at_ms=T0_MS,
        )


# --- 3106 differs -------------------------------------------------------------------------


def test_differing_fields_names_top_level_and_nested_fields() -> None:
    other = replace(PREPARE, amount_fen=1, giver=replace(PREPARE.giver, masked_name="李*"))
    assert differing_fields(PREPARE, other) == ["giver.masked_name", "amount_fen"]


def test_differing_fields_of_equal_bodies_is_empty() -> None:
    assert differing_fields(PREPARE, make_prepare()) == []


# --- statements ---------------------------------------------------------------------------


def entry(n: int, amount_fen: int, outcome: Outcome) -> StatementEntry:
    return StatementEntry(
        transfer_id=fixed_id(n), amount_fen=amount_fen, currency="CNY", outcome=outcome
    )


def test_statement_counts_and_sums_committed_grants_only() -> None:
    stmt = build_statement(
        "2026-03-15T10",
        [entry(1, 100, Outcome.COMMIT), entry(2, 50, Outcome.ABORT), entry(3, 7, Outcome.COMMIT)],
    )
    assert (stmt.count, stmt.sum_by_currency, len(stmt.bucket_hashes)) == (2, {"CNY": 107}, 256)


def test_statement_hash_does_not_depend_on_entry_order() -> None:
    entries = [entry(n, n * 10, Outcome.COMMIT) for n in range(1, 20)]
    assert build_statement("2026-03-15T10", entries) == build_statement(
        "2026-03-15T10", list(reversed(entries))
    )


def test_statement_mismatch_points_at_the_bucket_of_the_differing_transfer() -> None:
    ours = build_statement(
        "2026-03-15T10", [entry(1, 100, Outcome.COMMIT), entry(2, 50, Outcome.COMMIT)]
    )
    theirs = build_statement(
        "2026-03-15T10", [entry(1, 100, Outcome.COMMIT), entry(2, 50, Outcome.ABORT)]
    )
    assert ours.ids_hash != theirs.ids_hash
    assert differing_buckets(ours, theirs) == [statement_bucket(fixed_id(2))]


def test_statement_bucket_is_the_last_random_byte_of_the_id() -> None:
    assert statement_bucket("019cef38-c100-7000-8000-0000000000ff") == 255
