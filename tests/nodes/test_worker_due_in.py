"""A worker's idle pause ends when its `due_in` says work falls due (the 06:00 sweeper).

The pass and its hint are plain functions here: what is tested is the scheduling of
`WorkerSet`, which needs no database. The bounds are generous functional ones: with a
60 s interval, three passes within 5 s can only come from the hint.
"""

from __future__ import annotations

import asyncio
from typing import cast

from nodes.workers import Worker, WorkerSet
from wallet.context import WalletContext

NO_CONTEXT = cast(WalletContext, object())  # the passes below never look at it


async def _passes_within(
    due_in_s: float | None, *, fails: bool, wanted: int, within_s: float
) -> int:
    """Run an idle pass (60 s interval) with the given hint until `wanted` passes or
    `within_s`; return how many passes ran."""
    passes = 0
    enough = asyncio.Event()

    async def run_once(_: WalletContext) -> int:
        nonlocal passes
        passes += 1
        if passes >= wanted:
            enough.set()
        return 0  # idle: the pause follows

    async def due_in(_: WalletContext) -> float | None:
        if fails:
            raise RuntimeError("the hint's database is away")
        return due_in_s

    workers = WorkerSet(
        NO_CONTEXT, [Worker("hinted", run_once, 60.0, needs_plt=False, due_in=due_in)]
    )
    workers.start()
    try:
        await asyncio.wait_for(enough.wait(), timeout=within_s)
    except TimeoutError:
        pass
    finally:
        await workers.stop()
    return passes


async def test_the_pause_ends_when_the_hint_says_work_is_due() -> None:
    assert await _passes_within(0.05, fails=False, wanted=3, within_s=5.0) == 3


async def test_no_hint_or_a_failing_hint_keeps_the_interval() -> None:
    assert await _passes_within(None, fails=False, wanted=2, within_s=1.0) == 1
    assert await _passes_within(0.05, fails=True, wanted=2, within_s=1.0) == 1
