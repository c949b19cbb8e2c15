"""Deadlines and windows (b.7), UUIDv7 ids, and the error codes and tree (b.13)."""

import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from protocol.clock import (
    accept_deadline_ms,
    next_0600,
    resolver_delay_ms,
    retry_delay_ms,
    window_id,
)
from protocol.errors import (
    BadKeySet,
    BadSignature,
    ErrorClass,
    ErrorCode,
    ExpiredKey,
    MalformedMessage,
    ModifiedRequest,
    ProtocolError,
    RevokedKey,
    SignatureError,
    UnknownKey,
    UnknownPeer,
    UnknownTransfer,
    ValidationFailed,
    WrongRecipient,
)
from protocol.ids import is_uuid7, uuid7, uuid7_time_ms, validate_uuid7

SHANGHAI = ZoneInfo("Asia/Shanghai")


def ms(year: int, month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> int:
    """Milliseconds since the epoch of a wall-clock time in Shanghai."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=SHANGHAI).timestamp() * 1000)


# --- next_0600 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("made", "deadline"),
    [
        (ms(2026, 3, 15, 10, 0), ms(2026, 3, 16, 6, 0)),
        (ms(2026, 3, 15, 5, 59, 59) + 999, ms(2026, 3, 15, 6, 0)),
        (ms(2026, 3, 15, 6, 0), ms(2026, 3, 16, 6, 0)),  # strictly after: never born expired
        (ms(2026, 3, 15, 6, 0) + 1, ms(2026, 3, 16, 6, 0)),
        (ms(2026, 3, 15, 23, 59), ms(2026, 3, 16, 6, 0)),
        (ms(2026, 3, 16, 0, 0), ms(2026, 3, 16, 6, 0)),  # 16:00 UTC on the 15th
        (ms(2026, 12, 31, 22, 0), ms(2027, 1, 1, 6, 0)),
    ],
)
def test_deadline_is_the_first_0600_shanghai_after_the_instant(made: int, deadline: int) -> None:
    assert next_0600(made) == deadline


def test_deadline_hour_and_zone_are_settings() -> None:
    made = int(datetime(2026, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp() * 1000)
    expected = int(datetime(2026, 7, 2, 3, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp() * 1000)
    assert next_0600(made, tz="Europe/Berlin", hour=3) == expected


def test_accept_deadline_on_b_leaves_the_margin() -> None:
    assert accept_deadline_ms(1_000, 10_000, margin_ms=120) == 10_880


def test_window_is_the_local_hour_in_shanghai() -> None:
    assert window_id(ms(2026, 3, 15, 10, 59, 59)) == "2026-03-15T10"
    assert window_id(ms(2026, 3, 16, 0, 0)) == "2026-03-16T00"


def test_retry_delays_grow_and_cap_at_60_s() -> None:
    assert [retry_delay_ms(i) for i in range(4)] == [200, 500, 1_000, 2_000]
    assert retry_delay_ms(50) == 60_000 and retry_delay_ms(50, jitter=0.99) == 60_000
    assert retry_delay_ms(0, jitter=0.0) == 100
    assert [resolver_delay_ms(i) for i in range(5)] == [60_000, 120_000, 240_000, 300_000, 300_000]


# --- UUIDv7 -------------------------------------------------------------------------------


def test_uuid7_has_version_7_rfc_variant_and_the_time() -> None:
    value = uuid7(1_773_540_000_123, bytes(10))
    parsed = uuid.UUID(value)
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert uuid7_time_ms(value) == 1_773_540_000_123
    assert value == "019cef38-c17b-7000-8000-000000000000"


def test_uuid7_made_in_the_same_millisecond_keep_increasing() -> None:
    ids = [uuid7() for _ in range(2_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_uuid7(i) for i in ids)


@pytest.mark.parametrize(
    "value",
    [
        str(uuid.uuid4()),
        "019CEF38-C17B-7000-8000-000000000000",  # canonical form is lowercase
        "019cef38c17b70008000000000000000",
        "019cef38-c17b-7000-c000-000000000000",  # wrong variant
    ],
)
def test_non_canonical_or_non_v7_ids_are_refused(value: str) -> None:
    assert not is_uuid7(value)
    with pytest.raises(ValidationFailed, match="transfer_id"):
        validate_uuid7(value, "transfer_id")


# --- error codes --------------------------------------------------------------------------


def test_each_code_has_its_protocol_class() -> None:
    assert {c.value: c.error_class.value for c in ErrorCode} == {
        2003: "T", 2005: "T", 3100: "F", 3101: "F", 3105: "T", 3106: "F", 3204: "F", 3208: "F",
        3303: "R", 4000: "F", 4001: "T", 4200: "F", 4300: "F", 5104: "F", 5105: "F", 5200: "F",
    }  # fmt: skip
    assert all(c.title for c in ErrorCode)


def test_exception_tree_and_codes() -> None:
    assert issubclass(WrongRecipient, ValidationFailed)
    for cls in (BadSignature, UnknownKey, UnknownPeer, RevokedKey, ExpiredKey, BadKeySet):
        assert issubclass(cls, SignatureError) and cls.code is ErrorCode.BAD_SIGNATURE
    for base in (
        MalformedMessage,
        ValidationFailed,
        SignatureError,
        ModifiedRequest,
        UnknownTransfer,
    ):
        assert issubclass(base, ProtocolError)
    assert (MalformedMessage.code, ModifiedRequest.code, UnknownTransfer.code) == (3101, 3106, 3208)


def test_keyset_refresh_may_help_only_for_unknown_keys_and_bad_signatures() -> None:
    assert (
        UnknownKey("x").error_class is ErrorClass.T
        and BadSignature("x").error_class is ErrorClass.T
    )
    assert (
        RevokedKey("x").error_class is ErrorClass.F and UnknownPeer("x").error_class is ErrorClass.F
    )


def test_modified_request_lists_the_differing_fields() -> None:
    exc = ModifiedRequest(["amount_fen"])
    assert exc.differs == ["amount_fen"] and "amount_fen" in str(exc)
