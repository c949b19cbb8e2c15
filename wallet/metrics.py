"""Metrics in the Prometheus text format, with the Prometheus client library.

Three kinds of numbers, all in this process's registry (`REGISTRY`) or read at scrape time:

* counters and histograms kept in this process: HTTP requests by route, method and status
  (`COUNTERS`, `HTTP_REQUESTS`) and their latency by route (`plt_http_request_duration_seconds`),
  settlement latency, the per-phase latency of grant cycles seen by the giver's node, worker
  passes, manual grant resolutions. Per-process numbers are normal for Prometheus: each
  replica (and each worker process of `plt-node serve --workers N`) is scraped on its own,
  `sum()` adds counters up and `histogram_quantile(sum by (le) (rate(..._bucket)))` merges
  histograms; a restart starts them at 0, which `rate()` understands;
* the connection pool of this process (`plt_db_pool_connections`), read from the pool when
  `/metrics` is scraped;
* gauges read from the database at scrape time (`database_gauges`): grants by side and state,
  grants in doubt, the outbox per peer (rows unsent, age of the oldest), frozen peers,
  settlements and refunds. These describe the province's books, so every replica reports the
  same values: take `max()` over replicas, not `sum()`. Other modules add theirs with
  `register_database_gauges(reader)`; each reader is one or two statements on an index or a
  small table (docs/operations.md says what each costs).

Names follow the Prometheus conventions: `plt_` prefix, `_total` for counters, units in the
name (`_seconds`, `_fen`).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from protocol.clock import DECISION_UNACKED_ALERT_MS
from protocol.giver import GiverTransfer
from protocol.messages import Accept, Ack, Body, Received
from wallet import push
from wallet.context import WalletContext

# The framework adds `; charset=utf-8` to text media types: CONTENT_TYPE is what goes out.
MEDIA_TYPE = "text/plain; version=0.0.4"
CONTENT_TYPE = MEDIA_TYPE + "; charset=utf-8"

# No `<name>_created` series: Prometheus does not need them and they double the exposition.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()

Labels = tuple[tuple[str, str], ...]


class Counters:
    """This process's counters by name (thread-safe: the client library locks each sample)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._counters: dict[str, Counter] = {}

    def declare(self, name: str, help_text: str, labels: Sequence[str]) -> Counter:
        """Make a counter known, so it is exposed (with no samples) before its first bump."""
        with self._lock:
            counter = self._counters.get(name)
            if counter is None:
                counter = Counter(name, help_text, list(labels), registry=self._registry)
                self._counters[name] = counter
            return counter

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add `amount` to the counter `name` with these labels (declared on first use)."""
        counter = self._counters.get(name) or self.declare(name, name, sorted(labels))
        counter.labels(**labels).inc(amount)

    def value(self, name: str, **labels: str) -> float:
        """The current value (0 if never bumped): for tests and the console."""
        return self._registry.get_sample_value(name, labels) or 0.0


COUNTERS = Counters(REGISTRY)
HTTP_REQUESTS = "plt_http_requests_total"
WORKER_RUNS = "plt_worker_runs_total"
RESOLUTIONS = "plt_grant_manual_resolutions_total"
COUNTERS.declare(
    HTTP_REQUESTS,
    "HTTP requests answered, by route template, method and status.",
    ("route", "method", "status"),
)
COUNTERS.declare(
    WORKER_RUNS,
    "Worker passes, by worker and outcome (work: found rows, idle, error).",
    ("worker", "outcome"),
)
COUNTERS.declare(
    RESOLUTIONS,
    "Operator resolutions of grants in doubt, by side and outcome.",
    ("side", "outcome", "changed"),
)

# --- latency ------------------------------------------------------------------------------------

# An API answer takes milliseconds; a slow one (a lock wait, a pool wait) takes seconds.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A grant phase is a message crossing between provinces: from milliseconds to the sender's
# retries (seconds, minutes while a peer is down).
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

REQUEST_SECONDS = Histogram(
    "plt_http_request_duration_seconds",
    "Time from request to the end of the answer, by route template and method.",
    ("route", "method"),
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
SETTLEMENT_SECONDS = Histogram(
    "plt_settlement_duration_seconds",
    "Time an institution waits for a settlement's answer, by HTTP status.",
    ("status",),
    buckets=REQUEST_BUCKETS,
    registry=REGISTRY,
)
GRANT_PHASE_SECONDS = Histogram(
    "plt_grant_phase_seconds",
    "Grant cycles at the giver's node, by phase: prepare_to_received (PREPARE made until B's "
    "RECEIVED arrives), accept_to_decision (the receiver accepted at B until the decision is "
    "made here), decision_to_ack (decision made until B's ACK arrives).",
    ("phase",),
    buckets=PHASE_BUCKETS,
    registry=REGISTRY,
)
PHASES = ("prepare_to_received", "accept_to_decision", "decision_to_ack")
# The route template (method POST) whose requests are settlements.
SETTLEMENT_ROUTE = "/institution/v1/settlements"


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered HTTP request and its latency (the HTTP middleware calls this)."""
    COUNTERS.inc(HTTP_REQUESTS, route=route, method=method, status=str(status))
    REQUEST_SECONDS.labels(route=route, method=method).observe(seconds)
    if method == "POST" and route.rstrip("/") == SETTLEMENT_ROUTE:
        SETTLEMENT_SECONDS.labels(status=str(status)).observe(seconds)


def observe_grant_phases(
    row: Mapping[str, object] | None,
    old: GiverTransfer | None,
    new: GiverTransfer | None,
    body: Body,
    now: dt.datetime,
) -> None:
    """Observe the phase a message from B just ended at the giver's node (after its commit).

    From the grant's row as it was before the step (`created_at`, `decided_at`) and the two
    states: a first RECEIVED ends prepare_to_received, an ACCEPT that decided ends
    accept_to_decision (from the receiver's signed `accepted_at_ms`, B's clock), a first ACK
    ends decision_to_ack. Duplicates change nothing and are not observed."""
    if row is None or old is None or new is None:
        return
    for phase, started in _phase_ended(row, old, new, body):
        if started is not None:
            seconds = max(0.0, (now - started).total_seconds())
            GRANT_PHASE_SECONDS.labels(phase=phase).observe(seconds)


def _phase_ended(
    row: Mapping[str, object], old: GiverTransfer, new: GiverTransfer, body: Body
) -> Iterator[tuple[str, dt.datetime | None]]:
    if isinstance(body, Received | Accept) and new.b_seen and not old.b_seen:
        yield "prepare_to_received", _when(row.get("created_at"))
    if isinstance(body, Accept) and new.decision is not None and old.decision is None:
        yield "accept_to_decision", dt.datetime.fromtimestamp(body.accepted_at_ms / 1000, dt.UTC)
    if isinstance(body, Ack) and new.acked and not old.acked:
        yield "decision_to_ack", _when(row.get("decided_at"))


def _when(value: object) -> dt.datetime | None:
    return value if isinstance(value, dt.datetime) else None


# --- rendering ---------------------------------------------------------------------------------


@dataclass
class Family:
    """One gauge family read at scrape time: its help text and samples (labels -> value)."""

    name: str
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)

    def metric(self) -> Metric:
        names = sorted({k for labels in self.samples for k, _ in labels})
        family = GaugeMetricFamily(self.name, self.help, labels=names)
        for labels, value in sorted(self.samples.items()):
            values = dict(labels)
            family.add_metric([values[n] for n in names], value)
        return family


def gauge(name: str, help_text: str, samples: Mapping[Labels, float] | None = None) -> Family:
    """A gauge family with these samples."""
    return Family(name, help_text, dict(samples or {}))


class _Snapshot:
    """Gauges read once, exposed through the client library's writer."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.metric()


def render(families: Iterable[Family] = ()) -> str:
    """The text exposition of this process's registry, then of `families`."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(families))
    return (generate_latest(REGISTRY) + generate_latest(snapshot)).decode("utf-8")


def pool_gauges(pool: asyncpg.Pool | None) -> list[Family]:
    """This process's connection pool: connections in use, idle, and the most it may open."""
    if pool is None:
        return []
    size, idle = pool.get_size(), pool.get_idle_size()
    return [
        gauge(
            "plt_db_pool_connections",
            "Database connections of this process's pool, by state (in_use, idle).",
            {_label(state="in_use"): size - idle, _label(state="idle"): idle},
        ),
        gauge(
            "plt_db_pool_max_connections",
            "The most connections this process's pool may open (setting db_pool_max).",
            {(): pool.get_max_size()},
        ),
    ]


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


@dataclass(frozen=True)
class ScrapeContext:
    """What a database gauge reader gets: a connection (one scrape, one connection), the
    node's clock reading for this scrape, and the node's peers (for one sample each)."""

    conn: asyncpg.Connection
    now: dt.datetime
    peers: Sequence[str]


GaugeReader = Callable[[ScrapeContext], Awaitable[list[Family]]]
DATABASE_GAUGES: list[GaugeReader] = []


def register_database_gauges(reader: GaugeReader) -> GaugeReader:
    """Add a reader of gauges from the database, run at every scrape (usable as a decorator).

    Registering the same function again replaces it (a module re-imported in tests)."""
    DATABASE_GAUGES[:] = [r for r in DATABASE_GAUGES if r.__qualname__ != reader.__qualname__]
    DATABASE_GAUGES.append(reader)
    return reader


def _label(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


async def database_gauges(
    ctx: WalletContext, peers: Sequence[str] = (), now: dt.datetime | None = None
) -> list[Family]:
    """Every gauge read from this node's database, as of `now` (the node's clock)."""
    now = now or ctx.clock.now()
    families: list[Family] = []
    async with ctx.pool.acquire() as conn:
        scrape = ScrapeContext(conn, now, peers)
        for reader in DATABASE_GAUGES:
            families.extend(await reader(scrape))
    return families


@register_database_gauges
async def grant_gauges(scrape: ScrapeContext) -> list[Family]:
    """Grants by side and state (count and fen), and grants in doubt by side."""
    conn = scrape.conn
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
    unacked_before = scrape.now - dt.timedelta(milliseconds=DECISION_UNACKED_ALERT_MS)
    in_doubt = gauge(
        "plt_grants_in_doubt",
        "Grants an operator should look at (plt-node grants in-doubt), by side.",
        {
            _label(side="giver"): await conn.fetchval(_IN_DOUBT_OUT, scrape.now, unacked_before),
            _label(side="receiver"): await conn.fetchval(_IN_DOUBT_IN, scrape.now),
        },
    )
    return [grants, grants_fen, in_doubt]


@register_database_gauges
async def outbox_gauges(scrape: ScrapeContext) -> list[Family]:
    """The outbox backlog per peer (rows unsent, age of the oldest) and frozen peers."""
    unsent = gauge("plt_outbox_unsent", "Outbox messages not yet finished, by peer.")
    age = gauge(
        "plt_outbox_oldest_unsent_age_seconds",
        "Age of the oldest unfinished outbox message, by peer (0 when none).",
    )
    for peer in scrape.peers:
        unsent.samples[_label(peer=peer)] = 0
        age.samples[_label(peer=peer)] = 0
    for r in await scrape.conn.fetch(_OUTBOX):
        unsent.samples[_label(peer=r["to_node"])] = r["n"]
        oldest = max(0.0, (scrape.now - r["oldest"]).total_seconds())
        age.samples[_label(peer=r["to_node"])] = oldest
    frozen_nodes = {r["node"] for r in await scrape.conn.fetch(_FROZEN)}
    frozen = gauge(
        "plt_peer_frozen",
        "1 for a peer whose traffic is stopped after equivocation, until an operator lifts it.",
        {
            _label(peer=p): 1 if p in frozen_nodes else 0
            for p in sorted({*scrape.peers, *frozen_nodes})
        },
    )
    return [unsent, age, frozen]


@register_database_gauges
async def settlement_gauges(scrape: ScrapeContext) -> list[Family]:
    """Settlements (count, fen settled and refunded) and refunds."""
    s = await scrape.conn.fetchrow(_SETTLEMENTS)
    settlements = gauge("plt_settlements", "Settlements charged by institutions.", {(): s["n"]})
    settled = gauge(
        "plt_settlements_amount_fen",
        "Amounts settled and refunded, in fen.",
        {_label(kind="settled"): s["fen"], _label(kind="refunded"): s["refunded"]},
    )
    refunds = gauge(
        "plt_refunds", "Refunds of settlements.", {(): await scrape.conn.fetchval(_REFUNDS)}
    )
    return [settlements, settled, refunds]


@register_database_gauges
async def push_gauges(scrape: ScrapeContext) -> list[Family]:
    """The push backlog, its oldest row's age, retries and deliveries given up (wallet.push)."""
    return [gauge(n, h, {(): v}) for n, h, v in await push.gauges(scrape.conn, scrape.now)]
