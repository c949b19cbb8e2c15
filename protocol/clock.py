"""Deadlines, windows and retry schedules (PROTOCOL b.7). Time is always an argument.

Only node A's clock decides a transfer (`decide_by_ms`, evaluated by A); every other
timer here shapes user experience or traffic, never safety.
"""

from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

DEFAULT_TZ = "Asia/Shanghai"
DEFAULT_EXPIRY_HOUR = 6  # RULES 12: a grant not accepted by the next 06:00 expires [cfg]

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS

ACCEPT_MARGIN_MS = 2 * MINUTE_MS  # B stops offering "accept" this long before A's deadline [cfg]
RESOLVER_GRACE_MS = MINUTE_MS  # B asks A about a hold older than accept_within + this
RESOLVER_DELAY_MS_MAX = 5 * MINUTE_MS
IN_DOUBT_PAGE_MS = HOUR_MS  # page a human when a hold is in doubt this long after its deadline
DECISION_UNACKED_ALERT_MS = 15 * MINUTE_MS
CREATED_AT_SKEW_ALERT_MS = MINUTE_MS
SWEEP_INTERVAL_MS = 10 * SECOND_MS

RETRY_DELAYS_MS = (200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 40_000)
RETRY_DELAY_MS_MAX = 60_000


@lru_cache(maxsize=8)
def _zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)


def next_0600(now_ms: int, tz: str = DEFAULT_TZ, hour: int = DEFAULT_EXPIRY_HOUR) -> int:
    """`decide_by_ms`: the first `hour`:00 local time in `tz` strictly after `now_ms`.

    A grant made at exactly 06:00:00.000 gets the next day's 06:00, so it is never born expired.
    """
    if not 0 <= hour <= 23:
        raise ValueError(f"hour must be 0..23, got {hour}")
    zone = _zone(tz)
    local = datetime.fromtimestamp(now_ms / 1000, tz=zone)
    day = local.date()
    for _ in range(3):  # today, tomorrow; a third day only if a DST gap swallowed the hour
        candidate = datetime(day.year, day.month, day.day, hour, tzinfo=zone)
        candidate_ms = int(candidate.timestamp() * 1000)
        if candidate_ms > now_ms:
            return candidate_ms
        day += timedelta(days=1)
    raise AssertionError("unreachable: a later local hour always exists")


def accept_within_ms(decide_by_ms: int, now_ms: int) -> int:
    """The duration B is given to obtain acceptance, computed by A when PREPARE is made."""
    if decide_by_ms <= now_ms:
        raise ValueError("decide_by_ms must be in the future")
    return decide_by_ms - now_ms


def accept_deadline_ms(
    received_at_ms: int, accept_within_ms: int, margin_ms: int = ACCEPT_MARGIN_MS
) -> int:
    """On B's clock: the last instant B offers acceptance to the receiver (UI only)."""
    return received_at_ms + accept_within_ms - margin_ms


def window_id(at_ms: int, tz: str = DEFAULT_TZ) -> str:
    """Hourly reconciliation window stamped by A, e.g. `2026-03-15T10` (local hour in `tz`)."""
    return datetime.fromtimestamp(at_ms / 1000, tz=_zone(tz)).strftime("%Y-%m-%dT%H")


def retry_delay_ms(attempt: int, jitter: float = 0.5) -> int:
    """Delay before outbox attempt `attempt + 1` (attempt 0 is the first retry).

    0.2 s, 0.5 s, 1 s, 2 s ... capped at 60 s; `jitter` in [0, 1) spreads it over
    [50 %, 150 %) of the base so a province's retries after an outage do not arrive together.
    """
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    base = RETRY_DELAYS_MS[attempt] if attempt < len(RETRY_DELAYS_MS) else RETRY_DELAY_MS_MAX
    return min(RETRY_DELAY_MS_MAX, int(base * (0.5 + jitter)))


def resolver_delay_ms(attempt: int) -> int:
    """Delay between B's STATUS_REQ attempts for one hold: 1 min doubling to 5 min."""
    return min(RESOLVER_DELAY_MS_MAX, MINUTE_MS << min(attempt, 8))
