"""UUIDv7 (RFC 9562 §5.7) identifiers: time ordered, so ids sort and index like their creation.

Python 3.11 has no `uuid.uuid7`. Ids travel as the canonical lowercase 36-character form;
anything else is refused, so one transfer never has two spellings (and two hashes).
"""

import os
import re
import threading
import time
import uuid

from protocol.errors import ValidationFailed

UUID7_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
_UUID7_RE = re.compile(UUID7_PATTERN)

_TIMESTAMP_MS_MAX = (1 << 48) - 1
_lock = threading.Lock()
_last_value = 0


def uuid7(now_ms: int | None = None, random_bytes: bytes | None = None) -> str:
    """Return a new UUIDv7 string.

    Without arguments: current time and `os.urandom`, and monotonic within this process
    (an id that would not sort after the previous one, same millisecond or a clock step
    back, is the previous one plus one, RFC 9562 §6.2 method 2). With `now_ms` and `random_bytes` (10 bytes) the result is a pure function
    of them, which tests and the simulator use.
    """
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    if not 0 <= now_ms <= _TIMESTAMP_MS_MAX:
        raise ValueError(f"now_ms out of the 48-bit range: {now_ms}")
    explicit = random_bytes is not None
    rand = random_bytes if random_bytes is not None else os.urandom(10)
    if len(rand) != 10:
        raise ValueError(f"random_bytes must be 10 bytes, got {len(rand)}")
    value = _compose(now_ms, int.from_bytes(rand, "big"))
    if explicit:
        return str(uuid.UUID(int=value))
    global _last_value
    with _lock:
        if value <= _last_value:
            # Same millisecond, or the clock stepped back: keep ids increasing anyway.
            value = _successor(_last_value)
        _last_value = value
    return str(uuid.UUID(int=value))


def _compose(now_ms: int, rand80: int) -> int:
    rand_a = (rand80 >> 68) & 0xFFF
    rand_b = rand80 & ((1 << 62) - 1)
    return (now_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b


def _successor(value: int) -> int:
    # Increment the 74 random bits (rand_a ‖ rand_b) as one counter, skipping version/variant.
    now_ms = value >> 80
    rand_a = (value >> 64) & 0xFFF
    rand_b = value & ((1 << 62) - 1)
    counter = ((rand_a << 62) | rand_b) + 1
    if counter >= 1 << 74:
        # 2**74 ids in one millisecond cannot happen; borrow the next millisecond anyway.
        now_ms, counter = now_ms + 1, 0
    return _compose(now_ms, ((counter >> 62) << 68) | (counter & ((1 << 62) - 1)))


def is_uuid7(value: str) -> bool:
    """True when `value` is a canonical (lowercase, hyphenated) UUID of version 7."""
    return _UUID7_RE.fullmatch(value) is not None


def validate_uuid7(value: str, field: str = "id") -> str:
    """Return `value` unchanged, or raise ValidationFailed naming `field`."""
    if not is_uuid7(value):
        raise ValidationFailed(f"{field} must be a canonical lowercase UUIDv7, got {value!r}")
    return value


def uuid7_time_ms(value: str) -> int:
    """The Unix time in ms embedded in a UUIDv7 (for logs and ordering, never for deadlines)."""
    validate_uuid7(value)
    return uuid.UUID(value).int >> 80
