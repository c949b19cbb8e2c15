"""Readiness: does the database answer, and which peer nodes can this node reach?

A peer that is down does not make this node "not ready": the node still serves its own
province (wallets, settlements, in-province relationships), and everything bound for the
peer waits in the outbox. `/ready` answers 200 with `status: degraded` and names the peer;
only a database that does not answer makes it 503 (docs/operations.md, "Health").

A peer is probed with a GET of its key set (`/plt/v1/keyset`, the one document every node
publishes to its peers) with a short timeout. The answer is cached for `PROBE_TTL_MS` on
the node's clock, so a load balancer polling `/ready` every second does not poll every peer
every second; probes of several peers run concurrently.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import weakref
from dataclasses import dataclass

import httpx
import msgspec

from wallet.context import WalletContext
from wallet.plt.node import KEYSET_PATH, PltNode

PROBE_TIMEOUT_S = 1.0
PROBE_TTL_MS = 10_000

_LAST_HEARD = """
SELECT from_node, max(at) AS at FROM plt_message
WHERE direction = 'in' AND from_node = ANY($1::text[]) GROUP BY from_node
"""
_OUTBOX = """
SELECT to_node, count(*) AS n, min(created_at) AS oldest
FROM plt_outbox WHERE done_at IS NULL AND to_node = ANY($1::text[]) GROUP BY to_node
"""


class PeerReadiness(msgspec.Struct, frozen=True):
    """What this node knows about reaching one peer."""

    node: str
    reachable: bool
    checked_at: dt.datetime
    error: str | None
    # The last signed message received from the peer (a request or a reply), if any.
    last_message_at: dt.datetime | None
    outbox_unsent: int
    oldest_unsent_age_s: float


@dataclass(frozen=True)
class _Probe:
    at: dt.datetime
    reachable: bool
    error: str | None


# This node (its PltNode, which owns the HTTP client) -> peer -> the last probe.
_PROBES: weakref.WeakKeyDictionary[PltNode, dict[str, _Probe]] = weakref.WeakKeyDictionary()


async def _probe(plt: PltNode, peer: str, now: dt.datetime) -> _Probe:
    probes = _PROBES.setdefault(plt, {})
    cached = probes.get(peer)
    if cached is not None and dt.timedelta(0) <= now - cached.at < dt.timedelta(
        milliseconds=PROBE_TTL_MS
    ):
        return cached
    try:
        response = await plt.http.get(plt.url_of(peer) + KEYSET_PATH, timeout=PROBE_TIMEOUT_S)
        ok = response.status_code == 200
        probe = _Probe(now, ok, None if ok else f"HTTP {response.status_code}")
    except (httpx.HTTPError, OSError) as exc:
        probe = _Probe(now, False, type(exc).__name__)
    probes[peer] = probe
    return probe


async def peers(ctx: WalletContext) -> list[PeerReadiness]:
    """Every peer in the directory: reachable now (cached probe), last heard, outbox."""
    if ctx.plt is None:
        return []
    nodes = ctx.plt.directory.nodes
    if not nodes:
        return []
    now = ctx.clock.now()
    probes = await asyncio.gather(*(_probe(ctx.plt, n, now) for n in nodes))
    async with ctx.pool.acquire() as conn:
        heard = {r["from_node"]: r["at"] for r in await conn.fetch(_LAST_HEARD, nodes)}
        outbox = {r["to_node"]: r for r in await conn.fetch(_OUTBOX, nodes)}
    out: list[PeerReadiness] = []
    for node, probe in zip(nodes, probes, strict=True):
        box = outbox.get(node)
        out.append(
            PeerReadiness(
                node=node,
                reachable=probe.reachable,
                checked_at=probe.at,
                error=probe.error,
                last_message_at=heard.get(node),
                outbox_unsent=0 if box is None else box["n"],
                oldest_unsent_age_s=0.0
                if box is None
                else max(0.0, (now - box["oldest"]).total_seconds()),
            )
        )
    return out
