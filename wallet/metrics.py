"""Metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Two kinds of numbers:

* counters kept in this process (`COUNTERS`): HTTP requests by route, method and status,
  worker passes by worker and outcome, manual grant resolutions. Per-process counters are
  normal for Prometheus: each replica is scraped on its own and `sum()` adds them up; a
  restart starts them at 0, which `rate()` understands;
* gauges read from the database when `/metrics` is scraped (`database_gauges`): grants by
  side and state, grants in doubt, the outbox per peer (rows unsent, age of the oldest),
  frozen peers, settlements and refunds (counts and amounts). Each is one statement on an
  index or a small table; see docs/operations.md for what each costs.

Names follow the Prometheus conventions: `plt_` prefix, `_total` for counters, units in the
name (`_seconds`, `_fen`). Label values are escaped as the format requires.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from protocol.clock import DECISION_UNACKED_ALERT_MS
from wallet import push
from wallet.context import WalletContext

# The framework adds `; charset=utf-8` to text media types: CONTENT_TYPE is what goes out.
MEDIA_TYPE = "text/plain; version=0.0.4"
CONTENT_TYPE = MEDIA_TYPE + "; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric family: its help text, type and samples (label set -> value)."""

    name: str
    kind: str  # 'counter' | 'gauge'
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)


class Counters:
    """In-process counters, safe to bump from any thread or task."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Family] = {}

    def declare(self, name: str, help_text: str) -> None:
        """Make a counter known, so it is exposed (with no samples) before its first bump."""
        with self._lock:
            self._families.setdefault(name, Family(name, "counter", help_text))

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add `amount` to the counter `name` with these labels."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            family = self._families.setdefault(name, Family(name, "counter", name))
            family.samples[key] = family.samples.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        """The current value (0 if never bumped): for tests and the console."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            family = self._families.get(name)
            return 0 if family is None else family.samples.get(key, 0)

    def families(self) -> list[Family]:
        """A copy of every counter family, for rendering."""
        with self._lock:
            return [
                Family(f.name, f.kind, f.help, dict(f.samples)) for f in self._families.values()
            ]


COUNTERS = Counters()
HTTP_REQUESTS = "plt_http_requests_total"
WORKER_RUNS = "plt_worker_runs_total"
RESOLUTIONS = "plt_grant_manual_resolutions_total"
COUNTERS.declare(HTTP_REQUESTS, "HTTP requests answered, by route template, method and status.")
COUNTERS.declare(
    WORKER_RUNS, "Worker passes, by worker and outcome (work: found rows, idle, error)."
)
COUNTERS.declare(RESOLUTIONS, "Operator resolutions of grants in doubt, by side and outcome.")


# --- rendering ---------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family]) -> str:
    """The text exposition of `families` (HELP, TYPE, one line per sample)."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in sorted(family.samples.items()):
            if labels:
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{family.name}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def gauge(name: str, help_text: str, samples: Mapping[Labels, float] | None = None) -> Family:
    """A gauge family with these samples."""
    return Family(name, "gauge", help_text, dict(samples or {}))


# --- gauges from the database -------------------------------------------------------------------

GRANT_STATES_OUT = ("PREPARED_A", "COMMITTED", "ABORTED", "REJECTED")
GRANT_STATES_IN = (
    "PENDING_ACCEPT",
    "ACCEPTED",
    "DECLINED_PENDING",
    "DECLINED",
    "COMMITTED",
    "ABORTED",
)

_GRANTS_OUT = (
    "SELECT state, count(*) AS n, coalesce(sum(amount_fen), 0) AS fen FROM grant_out GROUP BY state"
)
_GRANTS_IN = """
SELECT state, count(*) AS n, coalesce(sum(amount_fen), 0) AS fen FROM grant_in GROUP BY state
"""
# The same conditions as `wallet.plt.grants.in_doubt` (the console's list), counted.
_IN_DOUBT_OUT = """
SELECT (SELECT count(*) FROM grant_out WHERE state = 'PREPARED_A' AND decide_by < $1)
     + (SELECT count(*) FROM grant_out
        WHERE state IN ('COMMITTED', 'ABORTED') AND NOT acked AND decided_at < $2)
"""
_IN_DOUBT_IN = """
SELECT count(*) FROM grant_in
WHERE state IN ('PENDING_ACCEPT', 'ACCEPTED', 'DECLINED_PENDING') AND next_status_at <= $1
"""
_OUTBOX = """
SELECT to_node, count(*) AS n, min(created_at) AS oldest
FROM plt_outbox WHERE done_at IS NULL GROUP BY to_node
"""
_FROZEN = "SELECT node FROM peer_link"
_SETTLEMENTS = """
SELECT count(*) AS n, coalesce(sum(amount_fen), 0) AS fen, coalesce(sum(refunded_fen), 0) AS refunded
FROM settlement
"""
_REFUNDS = "SELECT count(*) AS n FROM refund"


def _label(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


async def database_gauges(
    ctx: WalletContext, peers: Sequence[str] = (), now: dt.datetime | None = None
) -> list[Family]:
    """Every gauge read from this node's database, as of `now` (the node's clock)."""
    now = now or ctx.clock.now()
    unacked_before = now - dt.timedelta(milliseconds=DECISION_UNACKED_ALERT_MS)
    async with ctx.pool.acquire() as conn:
        families = await _read(conn, peers, now, unacked_before)
        families += [gauge(n, h, {(): v}) for n, h, v in await push.gauges(conn, now)]
        return families


async def _read(
    conn: asyncpg.Connection, peers: Sequence[str], now: dt.datetime, unacked_before: dt.datetime
) -> list[Family]:
    grants = gauge("plt_grants", "Grants by side (giver: node A, receiver: node B) and state.")
    grants_fen = gauge("plt_grants_amount_fen", "Sum of grant amounts by side and state, in fen.")
    for side, states, sql in (
        ("giver", GRANT_STATES_OUT, _GRANTS_OUT),
        ("receiver", GRANT_STATES_IN, _GRANTS_IN),
    ):
        found = {r["state"]: r for r in await conn.fetch(sql)}
        for state in states:
            row = found.get(state)
            grants.samples[_label(side=side, state=state)] = 0 if row is None else row["n"]
            grants_fen.samples[_label(side=side, state=state)] = 0 if row is None else row["fen"]
    in_doubt = gauge(
        "plt_grants_in_doubt",
        "Grants an operator should look at (plt-node grants in-doubt), by side.",
        {
            _label(side="giver"): await conn.fetchval(_IN_DOUBT_OUT, now, unacked_before),
            _label(side="receiver"): await conn.fetchval(_IN_DOUBT_IN, now),
        },
    )
    unsent = gauge("plt_outbox_unsent", "Outbox messages not yet finished, by peer.")
    age = gauge(
        "plt_outbox_oldest_unsent_age_seconds",
        "Age of the oldest unfinished outbox message, by peer (0 when none).",
    )
    for peer in peers:
        unsent.samples[_label(peer=peer)] = 0
        age.samples[_label(peer=peer)] = 0
    for r in await conn.fetch(_OUTBOX):
        unsent.samples[_label(peer=r["to_node"])] = r["n"]
        age.samples[_label(peer=r["to_node"])] = max(0.0, (now - r["oldest"]).total_seconds())
    frozen_nodes = {r["node"] for r in await conn.fetch(_FROZEN)}
    frozen = gauge(
        "plt_peer_frozen",
        "1 for a peer whose traffic is stopped after equivocation, until an operator lifts it.",
        {_label(peer=p): 1 if p in frozen_nodes else 0 for p in sorted({*peers, *frozen_nodes})},
    )
    s = await conn.fetchrow(_SETTLEMENTS)
    settlements = gauge("plt_settlements", "Settlements charged by institutions.", {(): s["n"]})
    settled = gauge(
        "plt_settlements_amount_fen",
        "Amounts settled and refunded, in fen.",
        {_label(kind="settled"): s["fen"], _label(kind="refunded"): s["refunded"]},
    )
    refunds = gauge("plt_refunds", "Refunds of settlements.", {(): await conn.fetchval(_REFUNDS)})
    return [grants, grants_fen, in_doubt, unsent, age, frozen, settlements, settled, refunds]
