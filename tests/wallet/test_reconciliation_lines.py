"""Drill-down comparison of two sides' statement lines (wallet.plt.statements.compare_lines)."""

from __future__ import annotations

from protocol.ids import uuid7
from protocol.messages import Outcome, StatementLine
from wallet.plt.statements import Difference, compare_lines

T0 = 1_773_626_400_000


def line(tid: str, amount_fen: int, outcome: Outcome = Outcome.COMMIT) -> StatementLine:
    return StatementLine(transfer_id=tid, giver="prov-13", amount_fen=amount_fen, outcome=outcome)


def test_each_kind_of_difference_is_named_by_transfer_id() -> None:
    same, amount, outcome, only_ours, only_theirs = sorted(uuid7(T0) for _ in range(5))
    ours = [line(same, 100), line(amount, 200), line(outcome, 300), line(only_ours, 400)]
    theirs = [
        line(same, 100),
        line(amount, 250),
        line(outcome, 0, Outcome.ABORT),
        line(only_theirs, 500),
    ]
    assert compare_lines(ours, theirs) == [
        Difference(amount, "prov-13", "COMMIT 200", "COMMIT 250"),
        Difference(outcome, "prov-13", "COMMIT 300", "ABORT 0"),
        Difference(only_ours, "prov-13", "COMMIT 400", "missing"),
        Difference(only_theirs, "prov-13", "missing", "COMMIT 500"),
    ]
    assert compare_lines(ours, list(reversed(ours))) == []
