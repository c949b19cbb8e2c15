"""A bank-style checker over every province's database: `plt-node check-network`.

It reads each node's ledger and grant tables (nothing is written) and reports:

* each ledger on its own: balanced, every account equal to its transfers, nothing overdrawn
  (`wallet.ledger.check_books`), and no customer account (personal, quota, institution)
  below zero;
* no fen created or lost across all ledgers: the money the provinces paid in (net debit of
  the funding accounts) equals the customers' money plus the clearing accounts' net
  position (`due_to`, `due_from`, and the monthly clearing's `payable` and `receivable`),
  summed over every ledger;
* at rest: every pair of clearing positions mirrors (A's `due_to:B` equals minus B's
  `due_from:A`, posted and pending; A's `payable:B` equals minus B's `receivable:A`),
  every grant is in a final state, and both sides of a
  grant agree (COMMITTED with COMMITTED; ABORTED with ABORTED, DECLINED or no row at B;
  REJECTED never reached B); nothing waits in an outbox.

With `at_rest=False` (traffic may be in flight) only the first two hold. Operators run it
after an incident; the container tests run it after every scenario.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

from wallet.ledger import BooksCheck, check_books

GIVER_FINAL = frozenset({"COMMITTED", "ABORTED", "REJECTED"})
RECEIVER_FINAL = frozenset({"COMMITTED", "ABORTED", "DECLINED"})
# Each clearing position at one node and the one that mirrors it at the peer.
MIRRORS: Mapping[str, str] = {"due_to": "due_from", "payable": "receivable"}
# What the receiver's row may be when the giver's row is final.
AGREES_WITH: Mapping[str, frozenset[str | None]] = {
    "COMMITTED": frozenset({"COMMITTED"}),
    "ABORTED": frozenset({"ABORTED", "DECLINED", None}),
    "REJECTED": frozenset({None}),
}

_CUSTOMER_MONEY = """
SELECT coalesce(sum(credits_posted - debits_posted), 0)::bigint FROM account
WHERE kind IN ('personal', 'quota', 'institution')
"""
_FUNDED = """
SELECT coalesce(sum(debits_posted - credits_posted), 0)::bigint FROM account WHERE kind = 'funding'
"""
_NEGATIVE = """
SELECT code FROM account
WHERE kind IN ('personal', 'quota', 'institution')
  AND credits_posted - debits_posted - debits_pending < 0
ORDER BY id
"""
# Clearing accounts are `due_to:<node>:<slot>` (A) and `due_from:<node>:<slot>` (B); the
# monthly clearing moves used quota on to `payable:<node>` (A) and `receivable:<node>` (B).
_CLEARING = """
SELECT kind, split_part(code, ':', 2) AS peer,
       coalesce(sum(credits_posted - debits_posted), 0)::bigint AS posted_fen,
       coalesce(sum(credits_pending - debits_pending), 0)::bigint AS pending_fen
FROM account WHERE kind IN ('due_to', 'due_from', 'payable', 'receivable')
GROUP BY kind, split_part(code, ':', 2)
ORDER BY kind, peer
"""
_GRANTS_OUT = "SELECT transfer_id, to_node, state, amount_fen, acked FROM grant_out"
_GRANTS_IN = "SELECT transfer_id, from_node, state, amount_fen FROM grant_in"
_OUTBOX_WAITING = "SELECT count(*) FROM plt_outbox WHERE done_at IS NULL"


@dataclass
class LedgerReport:
    """What the checker read off one province's database."""

    node: str
    books: BooksCheck
    customer_fen: int
    funded_fen: int
    negative_accounts: list[str]
    # (kind, peer) -> (posted, pending), A's due_to positive, B's due_from negative.
    clearing: dict[tuple[str, str], tuple[int, int]]
    grants_out: dict[str, tuple[str, str, int, bool]]  # transfer_id -> (to, state, fen, acked)
    grants_in: dict[tuple[str, str], tuple[str, int | None]]  # (from, tid) -> (state, fen)
    outbox_waiting: int


@dataclass
class NetworkCheck:
    """The verdict over every ledger; `ok` when there are no problems."""

    ledgers: dict[str, LedgerReport]
    at_rest: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def funded_fen(self) -> int:
        return sum(r.funded_fen for r in self.ledgers.values())

    @property
    def customer_fen(self) -> int:
        return sum(r.customer_fen for r in self.ledgers.values())

    @property
    def clearing_fen(self) -> int:
        return sum(p for r in self.ledgers.values() for p, _ in r.clearing.values())

    def grant_states(self) -> Counter[str]:
        """How many grants each giver-side state holds, over every node."""
        return Counter(g[1] for r in self.ledgers.values() for g in r.grants_out.values())


async def read_ledger(node: str, conn: asyncpg.Connection) -> LedgerReport:
    """One province's ledger and grants, read in one snapshot."""
    books = await check_books(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        customer = await conn.fetchval(_CUSTOMER_MONEY)
        funded = await conn.fetchval(_FUNDED)
        negative = [r["code"] for r in await conn.fetch(_NEGATIVE)]
        clearing = {
            (r["kind"], r["peer"]): (r["posted_fen"], r["pending_fen"])
            for r in await conn.fetch(_CLEARING)
        }
        grants_out = {
            r["transfer_id"]: (r["to_node"], r["state"], r["amount_fen"], r["acked"])
            for r in await conn.fetch(_GRANTS_OUT)
        }
        grants_in = {
            (r["from_node"], r["transfer_id"]): (r["state"], r["amount_fen"])
            for r in await conn.fetch(_GRANTS_IN)
        }
        outbox = await conn.fetchval(_OUTBOX_WAITING)
    return LedgerReport(
        node, books, customer, funded, negative, clearing, grants_out, grants_in, outbox
    )


async def check_network(dsns: Mapping[str, str], *, at_rest: bool = True) -> NetworkCheck:
    """Read every node's database (`{node_id: dsn}`) and check them together."""
    ledgers: dict[str, LedgerReport] = {}
    for node, dsn in dsns.items():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            ledgers[node] = await read_ledger(node, conn)
        finally:
            await conn.close()
    return judge(ledgers, at_rest=at_rest)


def judge(ledgers: Mapping[str, LedgerReport], *, at_rest: bool = True) -> NetworkCheck:
    """The checks of the module docstring over ledgers already read."""
    check = NetworkCheck(dict(ledgers), at_rest)
    problems = check.problems
    for report in ledgers.values():
        books = report.books
        if not books.balanced:
            problems.append(f"{report.node}: ledger not balanced: {books}")
        for code in report.negative_accounts:
            problems.append(f"{report.node}: account {code} is below zero")
    if check.funded_fen != check.customer_fen + check.clearing_fen:
        problems.append(
            f"money created or lost: provinces paid in {check.funded_fen} fen, customers hold "
            f"{check.customer_fen} fen and clearing holds {check.clearing_fen} fen"
        )
    if at_rest:
        _check_at_rest(ledgers, problems)
    return check


def _check_at_rest(ledgers: Mapping[str, LedgerReport], problems: list[str]) -> None:
    for report in ledgers.values():
        if report.outbox_waiting:
            problems.append(f"{report.node}: {report.outbox_waiting} message(s) wait in the outbox")
        for (kind, peer), (posted, pending) in report.clearing.items():
            if kind not in MIRRORS:
                # B's side: judged from A's below, unless A has no such position at all.
                other = ledgers.get(peer)
                a_kind = next(a for a, b in MIRRORS.items() if b == kind)
                if (posted, pending) != (0, 0) and (
                    other is None or (a_kind, report.node) not in other.clearing
                ):
                    problems.append(
                        f"{report.node} {kind}:{peer} is {(posted, pending)} but {peer} "
                        f"has no {a_kind}:{report.node}"
                    )
                continue
            other = ledgers.get(peer)
            if other is None:
                problems.append(f"{report.node}: clearing with {peer}, whose ledger is not read")
                continue
            mirror_kind = MIRRORS[kind]
            mirror = other.clearing.get((mirror_kind, report.node), (0, 0))
            if (posted, pending) != (-mirror[0], -mirror[1]):
                problems.append(
                    f"{report.node} {kind}:{peer} is {(posted, pending)} but {peer} "
                    f"{mirror_kind}:{report.node} is {mirror}"
                )
        for tid, (to, state, amount_fen, acked) in report.grants_out.items():
            other = ledgers.get(to)
            if other is None:
                problems.append(f"grant {tid}: receiver node {to} is not read")
                continue
            in_row = other.grants_in.get((report.node, tid))
            b_state = None if in_row is None else in_row[0]
            if state not in GIVER_FINAL:
                problems.append(f"grant {tid}: {report.node} is still {state} (in doubt)")
            elif b_state not in AGREES_WITH[state]:
                problems.append(f"grant {tid}: {report.node} says {state}, {to} says {b_state}")
            elif state != "REJECTED" and not acked:
                problems.append(f"grant {tid}: {report.node}'s decision is not acknowledged")
            if in_row is not None and in_row[1] not in (None, amount_fen):
                problems.append(f"grant {tid}: amounts differ ({amount_fen} and {in_row[1]})")
    for report in ledgers.values():
        for (giver, tid), (state, _) in report.grants_in.items():
            if state not in RECEIVER_FINAL:
                problems.append(f"grant {tid}: {report.node} is still {state} (in doubt)")
            giver_report = ledgers.get(giver)
            if giver_report is not None and tid not in giver_report.grants_out:
                problems.append(f"grant {tid}: {report.node} has it, {giver} never made it")


def describe(check: NetworkCheck) -> list[tuple[str, str]]:
    """Lines for the console: what was checked and the totals."""
    lines = [
        ("ledgers", ", ".join(sorted(check.ledgers))),
        ("paid in by provinces (fen)", str(check.funded_fen)),
        ("customers' money (fen)", str(check.customer_fen)),
        ("clearing, net (fen)", str(check.clearing_fen)),
    ]
    for state, count in sorted(check.grant_states().items()):
        lines.append((f"grants {state}", str(count)))
    return lines
