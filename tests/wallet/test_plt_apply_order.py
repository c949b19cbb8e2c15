"""`transport.in_order_per_key`: how the sender and the inbox apply the messages of one batch.

Messages about one thing (a transfer, relation or release id) keep their batch order;
messages about different things run side by side, never more than the bound at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from wallet.plt import transport
from wallet.plt.transport import in_order_per_key


async def test_one_key_keeps_its_order_and_keys_run_side_by_side_within_the_bound() -> None:
    log: list[tuple[str, str, int]] = []
    running = 0
    most = 0

    def step(key: str, n: int, pause_s: float) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            log.append(("start", key, n))
            await asyncio.sleep(pause_s)
            log.append(("end", key, n))
            running -= 1

        return run

    # Key "t1": a slow first step; its second must still wait for it.
    steps = [("t1", step("t1", 1, 0.05)), ("t1", step("t1", 2, 0.0))]
    steps += [(f"k{i}", step(f"k{i}", 1, 0.01)) for i in range(6)]
    await in_order_per_key(steps, parallel=3)

    t1 = [(what, n) for what, key, n in log if key == "t1"]
    assert t1 == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert most == 3
    assert len(log) == 16


async def test_a_single_key_runs_in_order_without_tasks() -> None:
    seen: list[int] = []

    def step(n: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            seen.append(n)

        return run

    await in_order_per_key([(None, step(n)) for n in range(5)])
    assert seen == [0, 1, 2, 3, 4]


def test_a_post_never_splits_the_rows_about_one_thing() -> None:
    # 300 rows about 100 things, three each, far apart in id order.
    rows = [
        transport._Row(id=i, to_node="prov-31", typ=typ, dedup_key=f"t{i % 100}",
                       body=b"x", attempts=0)
        for i, typ in enumerate(["PREPARE"] * 100 + ["DECISION"] * 100 + ["STATUS_REQ"] * 100)
    ]  # fmt: skip
    chunks = transport._chunks(rows)

    assert [len(c) for c in chunks] == [255, 45]  # 85 things, then 15
    assert sorted(r.id for c in chunks for r in c) == list(range(300))
    keys = [{r.dedup_key for r in c} for c in chunks]
    assert len(keys[0]) == 85 and len(keys[1]) == 15 and keys[0].isdisjoint(keys[1])
    for chunk in chunks:
        for key in {r.dedup_key for r in chunk}:
            ids = [r.id for r in chunk if r.dedup_key == key]
            assert ids == sorted(ids) and len(ids) == 3
