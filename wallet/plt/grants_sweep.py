"""The 06:00 herd at A: one batch of expired grants aborted in a few pipelined round trips.

`grants_giver.sweep_once` steps every expired PREPARED_A grant of a batch through the pure
state machine (`giver.Sweep`), exactly as one at a time would, then executes the effects of
the whole batch together in its one transaction: one statement voids every hold, one stops
the PREPARE rows, one queues the DECISIONs, and the audit rows go as one pipelined batch
(`executemany`); the caller saves the grant rows in one statement too. A step with any other effect than the sweep's own
(VoidHold, StopRetries(PREPARE), Send(DECISION), NotifyGiver) is handed back to be executed
one at a time, so nothing unexpected is ever batched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from protocol.effects import Effect, NotifyGiver, Send, StopRetries, VoidHold
from protocol.giver import GiverTransfer
from protocol.messages import MessageType, encode_body
from wallet import audit, ledger
from wallet.plt import notices, outbox
from wallet.plt.grants_base import PURPOSE_GRANT_RETURNED, grant_log_context, log

_BATCHED = (VoidHold, StopRetries, Send, NotifyGiver)


@dataclass(frozen=True)
class Swept:
    """One grant's sweep step: its locked row, the new state and the effects to execute."""

    row: asyncpg.Record
    new: GiverTransfer
    effects: tuple[Effect, ...]


def batchable(step: Swept) -> bool:
    """Whether the step's effects are the sweep's own, in the forms the batch executes."""
    for effect in step.effects:
        if not isinstance(effect, _BATCHED):
            return False
        if isinstance(effect, StopRetries) and effect.typ is not MessageType.PREPARE:
            return False
        if isinstance(effect, Send) and effect.typ is not MessageType.DECISION:
            return False
    return True


async def execute_batch(
    conn: asyncpg.Connection, steps: Sequence[Swept], now: dt.datetime, *, node: str
) -> None:
    """Execute the effects of `batchable` steps (all in the caller's transaction), except the
    grant rows themselves, which the caller saves."""
    voids: list[int] = []
    events: list[tuple[dt.datetime, str, str, str | None, dict[str, object]]] = []
    stops: list[tuple[str, MessageType, str]] = []
    sends: list[tuple[str, MessageType, str, bytes]] = []
    outcomes: list[tuple[str, str, int | None]] = []
    for step in steps:
        row, tid = step.row, step.row["transfer_id"]
        for effect in step.effects:
            if isinstance(effect, VoidHold):
                assert row["hold_id"] is not None
                voids.append(row["hold_id"])
                reason = None if step.new.decision is None else step.new.decision.reason
                detail: dict[str, object] = {
                    "side": "giver",
                    "amount_fen": row["amount_fen"],
                    "peer": row["to_node"],
                    "code": None if reason is None else int(reason.code),
                }
                events.append((now, "plt", "grant.abort", f"grant:{tid}", detail))
            elif isinstance(effect, StopRetries):
                stops.append((row["to_node"], effect.typ, tid))
            elif isinstance(effect, Send):
                sends.append((effect.to_node, effect.typ, tid, encode_body(effect.body)))
            elif isinstance(effect, NotifyGiver):
                with grant_log_context(node, tid):
                    log.info("grant_outcome", transfer_id=tid, state=effect.state)
                reason = None if step.new.decision is None else step.new.decision.reason
                outcomes.append((tid, effect.state, None if reason is None else int(reason.code)))
    if voids:
        await ledger.void_holds(conn, voids, PURPOSE_GRANT_RETURNED)
    if events:
        await audit.record_many(conn, events)
    if stops:
        await outbox.stop_many(conn, stops, now=now)
    if sends:
        await outbox.enqueue_many(conn, sends, now=now)
    await notices.to_givers(conn, outcomes, now)
