"""Manual resolution of grants in doubt (`wallet.plt.resolution`), over two real nodes.

Every allowed path does what the protocol would, and is audited; every refusal names its
rule and changes nothing (states, money and the audit trail are compared before and after).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from nodes.network import LocalNetwork, LocalNode
from protocol.ids import uuid7
from protocol.messages import Decision, MessageType, Outcome, Prepare, Received
from tests.network.grant_flow import (
    A,
    B,
    Pair,
    answer,
    check_books,
    expect_money,
    grant,
    linked_pair,
    money,
    set_clock,
    states,
)
from tests.network.support import app_get, client, rows, seal_from, wire_bytes
from tests.network.test_grant_faults import queued, send_by_hand
from tests.support import OPERATOR
from wallet.clock import ManualClock
from wallet.errors import ErrorCode, WalletError
from wallet.plt import grants, resolution

pytestmark = pytest.mark.network

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
DECIDE_BY = dt.datetime(2026, 3, 17, 6, 0, tzinfo=SHANGHAI)
REASON = "ticket OPS-7: grant stuck after the outage"


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


async def resolutions(node: LocalNode, tid: str) -> list[dict[str, Any]]:
    found = await rows(
        node,
        "SELECT actor, action, detail FROM audit_event WHERE subject = $1 AND action = $2"
        " ORDER BY id",
        f"grant:{tid}",
        "grant.resolve",
    )
    for r in found:
        r["detail"] = json.loads(r["detail"])
    return found


async def refused(node: LocalNode, tid: str, outcome: str, **kw: Any) -> WalletError:
    """Resolve and expect a refusal that changes nothing at either node."""
    pair_states = await _snapshot(node, tid)
    with pytest.raises(WalletError) as caught:
        await resolution.resolve(
            node.ctx,
            tid,
            outcome=outcome,
            reason=REASON,
            actor="ops-wang",
            **kw,  # type: ignore[arg-type]
        )
    assert await _snapshot(node, tid) == pair_states
    assert await resolutions(node, tid) == []
    return caught.value


async def _snapshot(node: LocalNode, tid: str) -> tuple[object, ...]:
    pool = node.ctx.pool
    return (
        await pool.fetchval("SELECT state FROM grant_out WHERE transfer_id = $1", tid),
        await pool.fetchval("SELECT state FROM grant_in WHERE transfer_id = $1", tid),
        await pool.fetchval("SELECT count(*) FROM ledger_transfer"),
        await pool.fetchval("SELECT count(*) FROM audit_event"),
        await pool.fetchval("SELECT count(*) FROM plt_outbox"),
    )


# --- at the giver's node (A) -------------------------------------------------------------------


async def test_at_a_an_overdue_grant_is_aborted_as_the_sweeper_would(
    pair: Pair, net_clock: ManualClock
) -> None:
    tid = await grant(pair, 80_000)
    early = await refused(pair.a, tid, "abort")
    assert (early.code, early.extensions["rule"]) == (ErrorCode.STATE_CONFLICT, "before_deadline")
    assert "the receiver may still accept" in early.detail

    await set_clock(pair, net_clock, DECIDE_BY + dt.timedelta(minutes=1))
    done = await resolution.resolve(
        pair.a.ctx, tid, outcome="abort", reason=REASON, actor="ops-wang"
    )
    assert (done.side, done.state_before, done.state_after, done.changed) == (
        "giver",
        "PREPARED_A",
        "ABORTED",
        True,
    )
    assert await grants.sweeper_run_once(pair.a.ctx) == 0  # nothing left for the sweeper
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    await expect_money(pair, giver=500_000)
    (audited,) = await resolutions(pair.a, tid)
    assert audited["actor"] == "ops-wang"
    assert {k: audited["detail"][k] for k in ("side", "outcome", "reason", "state_before")} == {
        "side": "giver",
        "outcome": "abort",
        "reason": REASON,
        "state_before": "PREPARED_A",
    }
    again = await resolution.resolve(
        pair.a.ctx, tid, outcome="abort", reason=REASON, actor="ops-wang"
    )
    assert (again.changed, again.state_after) == (False, "ABORTED")


async def test_at_a_a_commit_needs_evidence_and_a_decided_grant_is_never_contradicted(
    pair: Pair,
) -> None:
    tid = await grant(pair, 80_000)
    missing = await refused(pair.a, tid, "commit")
    assert missing.extensions["rule"] == "evidence_required"
    assert (await answer(pair, tid)).status_code == 200
    await pair.network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    for node in (pair.a, pair.b):
        contradiction = await refused(node, tid, "abort")
        assert contradiction.extensions["rule"] == "contradicts_signed_decision"
        assert "would contradict it" in contradiction.detail
    garbage = await refused(pair.a, tid, "commit", evidence=b'{"not": "a receipt"}')
    assert garbage.extensions["rule"] == "evidence_invalid"
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)


async def test_a_rejected_or_unknown_grant_is_refused(pair: Pair) -> None:
    unknown = "01960000-0000-7000-8000-000000000000"
    with pytest.raises(WalletError) as caught:
        await resolution.resolve(
            pair.a.ctx, unknown, outcome="abort", reason=REASON, actor="ops-wang"
        )
    assert caught.value.code is ErrorCode.NOT_FOUND
    tid = await grant(pair, 80_000)
    for bad, message in (({"reason": "x"}, "reason"), ({"actor": " "}, "operator")):
        with pytest.raises(WalletError) as caught:
            await resolution.resolve(
                pair.a.ctx,
                tid,
                outcome="abort",
                **{"reason": REASON, "actor": "ops-wang", **bad},  # type: ignore[arg-type]
            )
        assert caught.value.code is ErrorCode.INVALID_REQUEST and message in caught.value.detail


# --- at the receiver's node (B) ----------------------------------------------------------------


async def _committed_at_a_only(pair: Pair) -> tuple[str, Decision]:
    """A commits on B's ACCEPT, but the DECISION never reaches B (B stays ACCEPTED)."""
    tid = await grant(pair, 80_000)
    assert (await answer(pair, tid)).status_code == 200
    accept = await queued(pair.b, MessageType.ACCEPT, tid)
    decision = await send_by_hand(pair.b, pair.a, accept)  # the reply is "lost"
    assert isinstance(decision, Decision) and decision.outcome is Outcome.COMMIT
    assert await states(pair, tid) == ("COMMITTED", "ACCEPTED")
    return tid, decision


async def test_at_b_the_decision_is_fetched_from_a_and_only_it_is_applied(pair: Pair) -> None:
    tid, _ = await _committed_at_a_only(pair)
    contradiction = await refused(pair.b, tid, "abort")
    assert (contradiction.extensions["rule"], contradiction.extensions["signed"]) == (
        "contradicts_signed_decision",
        "commit",
    )
    assert contradiction.detail.startswith(f"{A} signed COMMIT for {tid}")
    done = await resolution.resolve(
        pair.b.ctx, tid, outcome="commit", reason=REASON, actor="ops-li"
    )
    assert (done.side, done.peer, done.state_before, done.state_after) == (
        "receiver",
        A,
        "ACCEPTED",
        "COMMITTED",
    )
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    (audited,) = await resolutions(pair.b, tid)
    assert audited["detail"]["basis"] == f"{A}'s signed DECISION, fetched now"
    await pair.network.run_senders()  # A's DECISION retry gets B's stored ACK
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)


async def test_at_b_with_a_down_only_a_signed_decision_as_evidence_is_applied(
    pair: Pair,
) -> None:
    tid, decision = await _committed_at_a_only(pair)
    evidence = wire_bytes(seal_from(pair.a, B, decision))
    forged = wire_bytes(seal_from(pair.b, B, decision))  # signed by B itself
    await pair.network.stop_node(A)
    unreachable = await refused(pair.b, tid, "commit")
    assert (unreachable.code, unreachable.extensions["rule"]) == (
        ErrorCode.SERVICE_UNAVAILABLE,
        "giver_node_unreachable",
    )
    not_a = await refused(pair.b, tid, "commit", evidence=forged)
    assert not_a.extensions["rule"] == "evidence_invalid"
    against = await refused(pair.b, tid, "abort", evidence=evidence)
    assert against.extensions["rule"] == "contradicts_signed_decision"
    done = await resolution.resolve(
        pair.b.ctx, tid, outcome="commit", reason=REASON, actor="ops-li", evidence=evidence
    )
    assert (done.state_before, done.state_after, done.changed) == ("ACCEPTED", "COMMITTED", True)
    await pair.network.start_node(A)
    await pair.network.run_senders()
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)


async def test_at_b_a_grant_a_has_not_decided_is_refused(pair: Pair) -> None:
    tid = await grant(pair, 80_000)
    for outcome in ("abort", "commit"):
        undecided = await refused(pair.b, tid, outcome)
        assert (undecided.extensions["rule"], undecided.extensions["giver_state"]) == (
            "no_signed_decision",
            "PREPARED_A",
        )
    await expect_money(pair, giver=420_000, held=80_000)


# --- the repair of PROTOCOL b.9.5 --------------------------------------------------------------


async def _swap_database(network: LocalNetwork, node: LocalNode, snapshot: str) -> str:
    """Fail `node` over to `snapshot` (an older copy of its database); return the lost one."""
    admin = await asyncpg.connect(network.admin_dsn)
    name = node.database_url.rsplit("/", 1)[1]
    lost = f"{name}_lost"
    try:
        await admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{lost}"')
        await admin.execute(f'ALTER DATABASE "{snapshot}" RENAME TO "{name}"')
    finally:
        await admin.close()
    return lost


async def _copy_database(network: LocalNetwork, node: LocalNode, copy: str) -> None:
    admin = await asyncpg.connect(network.admin_dsn)
    name = node.database_url.rsplit("/", 1)[1]
    try:
        await admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
    finally:
        await admin.close()


async def _drop(network: LocalNetwork, name: str) -> None:
    admin = await asyncpg.connect(network.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_a_commit_lost_in_a_failover_at_a_is_repaired_from_the_receipt(
    pair: Pair, net_clock: ManualClock
) -> None:
    network = pair.network
    tid = await grant(pair, 80_000)
    # A replica of A's database as it was before the COMMIT (asynchronous replication).
    await network.stop_node(A)
    snapshot = f"snap_{tid[-12:]}"
    await _copy_database(network, pair.a, snapshot)
    await network.start_node(A)
    assert (await answer(pair, tid)).status_code == 200
    await network.run_senders()
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    receipt = await app_get(pair.receiver, f"/app/v1/grants/{tid}/receipt")
    assert receipt.status_code == 200, receipt.text

    # Failover: A comes back without the COMMIT.
    await network.stop_node(A)
    lost = await _swap_database(network, pair.a, snapshot)
    try:
        await network.start_node(A)
        await set_clock(pair, net_clock, net_clock.now())
        assert await states(pair, tid) == ("PREPARED_A", "COMMITTED")
        before = await money(pair)
        assert (before.giver_pending, before.quota_available) == (80_000, 80_000)

        tampered = receipt.json() | {"amount_fen": 800_000}
        bad = await refused(pair.a, tid, "commit", evidence=json.dumps(tampered).encode())
        assert bad.extensions["rule"] == "evidence_invalid"
        done = await resolution.resolve(
            pair.a.ctx, tid, outcome="commit", reason=REASON, actor="ops-wang",
            evidence=receipt.content,
        )  # fmt: skip
        assert (done.state_before, done.state_after) == ("PREPARED_A", "COMMITTED")
        await network.run_senders()  # the same DECISION again: B answers with its stored ACK
        acked = await pair.a.ctx.pool.fetchval(
            "SELECT acked FROM grant_out WHERE transfer_id = $1", tid
        )
        assert acked is True
        frozen = await pair.b.ctx.pool.fetchval("SELECT count(*) FROM peer_link")
        assert frozen == 0  # no equivocation: B saw the very same decision
        await set_clock(pair, net_clock, DECIDE_BY + dt.timedelta(minutes=1))
        assert await grants.sweeper_run_once(pair.a.ctx) == 0
        await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)
        alerts = await rows(
            pair.a, "SELECT action FROM audit_event WHERE subject = $1 ORDER BY id", f"grant:{tid}"
        )
        assert [a["action"] for a in alerts] == [
            "grant.hold",
            "grant.commit",
            "alert.repaired",
            "grant.resolve",
        ]
    finally:
        await _drop(network, lost)


# --- the same through /operator/v1 ------------------------------------------------------------


async def test_the_operator_api_lists_resolves_and_shows_the_trail(
    pair: Pair, net_clock: ManualClock
) -> None:
    tid = await grant(pair, 80_000)
    headers = {**OPERATOR, "X-Operator-Name": "ops-wang", "X-Request-ID": "ops-req-1"}
    path = f"/operator/v1/grants/{tid}/resolution"
    async with client(pair.a) as http:
        assert (await http.get("/operator/v1/grants/in-doubt", headers=OPERATOR)).json() == []
        early = await http.post(path, json={"outcome": "abort", "reason": REASON}, headers=headers)
        assert (early.status_code, early.json()["code"], early.json()["rule"]) == (
            409,
            "state_conflict",
            "before_deadline",
        )
        bad = await http.post(path, json={"outcome": "maybe", "reason": REASON}, headers=headers)
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")
        await set_clock(pair, net_clock, DECIDE_BY + dt.timedelta(minutes=1))
        listed = (await http.get("/operator/v1/grants/in-doubt", headers=OPERATOR)).json()
        assert [(g["side"], g["transfer_id"], g["state"]) for g in listed] == [
            ("giver", tid, "PREPARED_A")
        ]
        done = await http.post(path, json={"outcome": "abort", "reason": REASON}, headers=headers)
        assert done.status_code == 200, done.text
        assert (done.json()["state_before"], done.json()["state_after"]) == (
            "PREPARED_A",
            "ABORTED",
        )
        trail = await http.get(
            "/operator/v1/audit",
            params={"since": "1d", "subject": f"grant:{tid}", "action": "grant.resolve"},
            headers=OPERATOR,
        )
    assert trail.status_code == 200, trail.text
    assert [(e["actor"], e["action"], e["request_id"]) for e in trail.json()] == [
        ("ops-wang", "grant.resolve", "ops-req-1")
    ]
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")


async def test_at_b_a_presumed_abort_allows_only_abort(pair: Pair) -> None:
    """B holds a grant A has no row for (A lost it): A's signed STATUS presumes ABORT."""
    real = await grant(pair, 80_000)
    prepare = await queued(pair.a, MessageType.PREPARE, real)
    assert isinstance(prepare, Prepare)
    lost = uuid7()
    orphan = msgspec.structs.replace(prepare, transfer_id=lost, a_hold_id=uuid7())
    assert isinstance(await send_by_hand(pair.a, pair.b, orphan), Received)
    assert await states(pair, lost) == (None, "PENDING_ACCEPT")
    contradiction = await refused(pair.b, lost, "commit")
    assert contradiction.extensions["rule"] == "contradicts_signed_decision"
    assert "presumed" in contradiction.detail
    done = await resolution.resolve(
        pair.b.ctx, lost, outcome="abort", reason=REASON, actor="ops-li"
    )
    assert (done.state_before, done.state_after, done.changed) == (
        "PENDING_ACCEPT",
        "ABORTED",
        True,
    )
    presumed = await pair.b.ctx.pool.fetchval(
        "SELECT presumed_abort FROM grant_in WHERE transfer_id = $1", lost
    )
    assert presumed is True
    await expect_money(pair, giver=420_000, held=80_000)  # the real grant is untouched
