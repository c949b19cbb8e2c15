"""Wake the outbox sender when a message is committed, instead of waiting for its next poll.

`outbox.enqueue` runs `pg_notify('plt_outbox', '')` in the enqueueing transaction, so the
notification is delivered exactly when (and only if) the row commits: a sender woken by it
always finds the row visible. `listen` holds one pooled connection with `LISTEN plt_outbox`
and sets this node's `outbox_event`; the sender worker waits on that event (and still polls
every `transport.SENDER_IDLE_S`, for retries coming due and as a fallback while the LISTEN
connection is being re-opened). Because the wake-up goes through PostgreSQL, every replica
of a node (all sharing its database) is woken by every replica's commits.

Cost: PostgreSQL serialises the commits of notifying transactions of one database (a lock
held from pre-commit to the end of commit). Only enqueueing transactions notify, at most
once each (equal notifications in one transaction are folded into one).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref

import asyncpg
import structlog

from wallet.context import WalletContext

log = structlog.get_logger("wallet.plt.wakeup")

CHANNEL = "plt_outbox"
RECONNECT_PAUSE_S = 1.0
ALIVE_CHECK_S = 5.0  # how often a quiet LISTEN connection is checked for loss

# Per context (one per running node; tests run several in one process). Keyed by id: the
# context is an unhashable dataclass; the entry goes with the context.
_EVENTS: dict[int, asyncio.Event] = {}


def outbox_event(ctx: WalletContext) -> asyncio.Event:
    """The event set whenever an outbox row of this node's database was committed."""
    event = _EVENTS.get(id(ctx))
    if event is None:
        event = _EVENTS[id(ctx)] = asyncio.Event()
        weakref.finalize(ctx, _EVENTS.pop, id(ctx), None)
    return event


async def listen(ctx: WalletContext, stop: asyncio.Event) -> None:
    """Keep a LISTEN connection open until `stop` is set (or the task is cancelled).

    A lost connection (database restart) is re-opened after a pause; meanwhile the sender
    falls back to polling, so nothing waits longer than it did without wake-ups.
    """
    event = outbox_event(ctx)

    def notified(*_: object) -> None:
        event.set()

    while not stop.is_set():
        try:
            async with ctx.pool.acquire() as conn:
                await conn.add_listener(CHANNEL, notified)
                try:
                    event.set()  # rows committed while nobody listened
                    while not stop.is_set() and not conn.is_closed():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=ALIVE_CHECK_S)
                        if not stop.is_set():
                            await conn.execute("SELECT 1")  # raises if the connection died
                finally:
                    if not conn.is_closed():
                        await conn.remove_listener(CHANNEL, notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("plt_wakeup_listen_lost", error=repr(exc))
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RECONNECT_PAUSE_S)
