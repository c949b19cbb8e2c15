"""Bad STATEMENTs and USAGEs between real nodes: each refused with its code and a message that
names the problem, and nothing changed; duplicates answered the same way."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from nodes.network import LocalNetwork, LocalNode
from protocol.envelope import Envelope
from protocol.ids import uuid7
from protocol.messages import (
    MessageType,
    Outcome,
    ReconReply,
    StatementEntry,
    Usage,
    UsageLine,
    build_statement,
    decode_body,
)
from tests.network.support import client, now_ms, post_batch, rows, seal_from
from tests.network.test_transport import error_of, replies
from tests.support import OPERATOR
from wallet.clock import ManualClock
from wallet.plt import statements

pytestmark = pytest.mark.network

CST = dt.timezone(dt.timedelta(hours=8))
WINDOWS = "SELECT window_id, state, peer_hash FROM recon_window ORDER BY window_id"
USAGES = "SELECT direction, peer, month, part, used_fen FROM clearing_usage"


async def send(to: LocalNode, env: Envelope) -> Envelope:
    [reply] = replies(await post_batch(to, [env]))
    return reply


def recon_reply(env: Envelope) -> ReconReply:
    assert env.typ is MessageType.RECON_REPLY, env.typ
    body = decode_body(env.typ, env.body)
    assert isinstance(body, ReconReply)
    return body


async def test_bad_statements_are_refused_and_an_empty_window_reconciles(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    empty = build_statement("2026-03-16T08", [])  # 08:00-09:00 Shanghai; the clock says 10:00

    env = seal_from(a, "prov-31", empty)
    forged = msgspec.structs.replace(env, body=env.body[:-1] + b"\x00")
    error = error_of(await send(b, forged))
    assert (error.error.code, error.error.class_) == (3105, "F")

    still_open = build_statement("2026-03-16T10", [])
    error = error_of(await send(b, seal_from(a, "prov-31", still_open)))
    assert error.error.code == 3100
    assert error.error.text.startswith("unknown window 2026-03-16T10: still open at prov-31")

    no_such_hour = build_statement("2026-02-30T10", [])
    error = error_of(await send(b, seal_from(a, "prov-31", no_such_hour)))
    assert error.error.code == 3100
    assert "unknown window '2026-02-30T10': not an hour of the calendar" in error.error.text
    assert await rows(b, WINDOWS) == []

    # A good statement is stored once; we have not stated the window yet: PENDING.
    good = seal_from(a, "prov-31", empty)
    assert recon_reply(await send(b, good)).outcome == "PENDING"
    again = recon_reply(await send(b, good))
    assert (again.outcome, again.subject) == ("PENDING", "2026-03-16T08")
    stored = await rows(b, WINDOWS)
    assert [(r["window_id"], r["state"]) for r in stored] == [("2026-03-16T08", "OPEN")]

    # Another body for the same window: 3106 naming the fields; the stored one stays.
    entry = StatementEntry(uuid7(now_ms(a)), 5_000, "CNY", Outcome.COMMIT)
    other = build_statement("2026-03-16T08", [entry])
    error = error_of(await send(b, seal_from(a, "prov-31", other)))
    assert error.error.code == 3106
    assert error.differs == ("count", "sum_by_currency", "ids_hash", "bucket_hashes")
    assert await rows(b, WINDOWS) == stored

    # An empty window is legitimate: B states it empty too, and it reconciles.
    assert await statements.run_once(b.ctx) == 1
    assert [(r["window_id"], r["state"]) for r in await rows(b, WINDOWS)] == [
        ("2026-03-16T08", "RECONCILED")
    ]
    async with client(b) as http:
        listed = await http.get(
            "/operator/v1/reconciliation/windows",
            params={"peer": "prov-13", "prefix": "2026-03-16"},
            headers=OPERATOR,
        )
        assert listed.status_code == 200, listed.text
        assert [
            (w["window_id"], w["state"], w["our_count"], w["peer_count"]) for w in listed.json()
        ] == [("2026-03-16T08", "RECONCILED", 0, 0)]
        bad = await http.get(
            "/operator/v1/reconciliation/windows", params={"peer": "PROV 13"}, headers=OPERATOR
        )
        assert bad.status_code == 400, bad.text


def usage(month: str, lines: tuple[UsageLine, ...], at_ms: int) -> Usage:
    return Usage(
        month=month,
        part=1,
        parts=1,
        lines=lines,
        used_fen=sum(line.used_fen for line in lines),
        cleared_at_ms=at_ms,
    )


async def test_bad_usage_is_refused_and_books_nothing(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    nothing = usage("2026-03", (), now_ms(a))
    error = error_of(await send(b, seal_from(a, "prov-31", nothing)))
    assert (error.error.code, error.error.text) == (3100, "month 2026-03 is still open at prov-31")

    net_clock.set(dt.datetime(2026, 4, 2, 12, 0, tzinfo=CST))
    line = UsageLine(
        transfer_id=uuid7(now_ms(a)),
        granted_fen=100_000,
        used_fen=30_000,
        used_total_fen=30_000,
        released_fen=0,
    )
    unknown = usage("2026-03", (line,), now_ms(a))
    error = error_of(await send(b, seal_from(a, "prov-31", unknown)))
    assert error.error.code == 3100
    assert error.error.text == f"usage of {line.transfer_id}: no committed grant to prov-13"
    assert await rows(b, USAGES) == []
    assert await rows(b, "SELECT code FROM account WHERE kind = 'payable'") == []

    # An empty USAGE (nothing spent) is booked as 0, once; the same again gets the same answer.
    empty = usage("2026-03", (), now_ms(a))
    env = seal_from(a, "prov-31", empty)
    first = recon_reply(await send(b, env))
    assert (first.outcome, first.booked_fen, first.subject) == ("BOOKED", 0, "2026-03/1")
    assert recon_reply(await send(b, env)) == first
    assert await rows(b, USAGES) == [
        {"direction": "in", "peer": "prov-13", "month": "2026-03", "part": 1, "used_fen": 0}
    ]
    later = usage("2026-03", (), now_ms(a) + 1)
    error = error_of(await send(b, seal_from(a, "prov-31", later)))
    assert (error.error.code, error.differs) == (3106, ("cleared_at_ms",))


async def test_a_stale_statement_heals_by_drill_down_and_an_unreachable_peer_is_reported(
    network: LocalNetwork, net_clock: ManualClock
) -> None:
    a, b = network["prov-13"], network["prov-31"]
    # A's statement names a transfer that neither side holds now (as if a row had come and
    # gone); B states the window empty: the statements differ.
    entry = StatementEntry(uuid7(now_ms(a)), 5_000, "CNY", Outcome.COMMIT)
    stated = build_statement("2026-03-16T08", [entry])
    assert recon_reply(await send(b, seal_from(a, "prov-31", stated))).outcome == "PENDING"
    await statements.run_once(b.ctx)  # closes, compares, and drills down at once
    [row] = await rows(b, "SELECT state, differing_buckets FROM recon_window")
    assert row["state"] == "RECONCILED"  # A's current rows agree with B's: nothing differs

    other = build_statement("2026-03-16T07", [entry])
    assert recon_reply(await send(b, seal_from(a, "prov-31", other))).outcome == "PENDING"
    await network.stop_node("prov-13")
    await statements.run_once(b.ctx)
    [report] = await statements.reconcile(b.ctx, "prov-13", "2026-03-16T07")
    assert report.state == "CLOSED"
    assert report.problem is not None and report.problem.startswith("prov-13 could not be asked")
    await network.start_node("prov-13")
    [report] = await statements.reconcile(b.ctx, "prov-13", "2026-03-16T07")
    assert (report.state, report.differences, report.problem) == ("RECONCILED", (), None)
