"""Background workers of a node, started and stopped by the app's lifespan.

A worker is a *pass* (`async def run_once(ctx) -> result`) run over and over: again at once
while the pass found work (a truthy result: rows handled, a non-empty SendReport), else
after `interval_s`, or sooner when its `wake` event is set (the outbox sender is woken by
every committed outbox row: `wallet.plt.wakeup`, whose LISTEN task runs beside the workers),
or when its `due_in` says its next work falls due (the grants sweeper wakes at the earliest
deadline it knows of, not up to `interval_s` after it). Workers coordinate through PostgreSQL only (SKIP LOCKED, leases), so any
number of replicas of a node may run them. A pass that raises is logged and retried after a
growing pause; it never takes the node down. Stopping lets the current pass finish (up to a
timeout), then cancels it: every pass is made of short transactions, so a cancelled one
leaves nothing half done (claimed outbox rows come due again when their lease ends).

Register a pass with `register_worker(name, run_once, interval_s=...)` below, in this
module (wallet/ never imports nodes/).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from wallet import metrics, notifications, push, settlement
from wallet.context import WalletContext
from wallet.plt import clearing, grants, statements, transport, wakeup

log = structlog.get_logger("nodes.workers")

FAILURE_PAUSE_S_MIN = 1.0
FAILURE_PAUSE_S_MAX = 30.0
STOP_TIMEOUT_S = 5.0

Pass = Callable[[WalletContext], Awaitable[object]]
Wake = Callable[[WalletContext], asyncio.Event]
DueIn = Callable[[WalletContext], Awaitable[float | None]]


@dataclass(frozen=True)
class Worker:
    name: str
    run_once: Pass
    interval_s: float
    # Passes that talk to peers need the node's PLT/1 keys; without them they do not start.
    needs_plt: bool = True
    # An event that ends the idle pause early (set when there is new work for the pass).
    wake: Wake | None = None
    # Seconds until the pass will next find work (None: nothing known); the idle pause is cut
    # to it, so work due at a known instant starts at that instant.
    due_in: DueIn | None = None


WORKERS: list[Worker] = []


def register_worker(
    name: str,
    run_once: Pass,
    *,
    interval_s: float,
    needs_plt: bool = True,
    wake: Wake | None = None,
    due_in: DueIn | None = None,
) -> Worker:
    """Add (or replace, by name) a worker pass run every `interval_s` while idle, at once
    when `wake(ctx)` is set, or when `due_in(ctx)` seconds have passed if that is sooner."""
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    worker = Worker(name, run_once, interval_s, needs_plt, wake, due_in)
    WORKERS[:] = [w for w in WORKERS if w.name != name]
    WORKERS.append(worker)
    return worker


# --- the node's workers ------------------------------------------------------------------------

# Transport: deliver the outbox; keep peers' key sets fresh.
register_worker(
    "plt-sender",
    transport.run_once,
    interval_s=transport.SENDER_IDLE_S,
    wake=wakeup.outbox_event,
)
register_worker(
    "plt-keysets", transport.refresh_keysets_once, interval_s=transport.KEYSET_REFRESH_S
)
# Grants: A aborts grants past their deadline; B asks A about holds in doubt.
register_worker(
    "grants-sweeper",
    grants.sweeper_run_once,
    interval_s=grants.SWEEP_INTERVAL_S,
    due_in=grants.sweeper_due_in,
)
register_worker("grants-resolver", grants.resolver_run_once, interval_s=grants.RESOLVE_INTERVAL_S)
# Reconciliation: close ready windows and send their STATEMENTs (clearing: USAGE handlers).
register_worker(
    "recon-statements", statements.run_once, interval_s=statements.STATEMENTS_INTERVAL_S
)
# Settlement: delete payment codes long expired (in-province; runs without PLT/1 keys too).
register_worker(
    "payment-codes-purge",
    settlement.purge_payment_codes,
    interval_s=settlement.PURGE_INTERVAL_S,
    needs_plt=False,
)
# Notifications: push each one to the province's push service (in-province too).
register_worker("notifications-push", push.run_once, interval_s=push.IDLE_S, needs_plt=False)
# Notifications: delete those past the retention (once pushed or given up).
register_worker(
    "notifications-purge",
    notifications.purge_expired,
    interval_s=notifications.PURGE_INTERVAL_S,
    needs_plt=False,
)
_RECON_HANDLERS = (clearing.on_usage, clearing.on_recon_reply)  # USAGE, RECON_REPLY


class WorkerSet:
    """The running workers of one node."""

    def __init__(self, ctx: WalletContext, workers: Sequence[Worker] | None = None) -> None:
        self._ctx = ctx
        self._workers = list(WORKERS if workers is None else workers)
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listener: asyncio.Task[None] | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def start(self) -> None:
        """Start every worker this node can run (peer-facing ones only with PLT/1 keys)."""
        for worker in self._workers:
            if worker.needs_plt and self._ctx.plt is None:
                log.info("worker_skipped", worker=worker.name, reason="no PLT/1 keys")
                continue
            self._tasks[worker.name] = asyncio.create_task(
                self._supervise(worker), name=f"worker:{worker.name}"
            )
        if any(w.wake is wakeup.outbox_event for w in self._workers if w.name in self._tasks):
            self._listener = asyncio.create_task(
                wakeup.listen(self._ctx, self._stop), name="worker-wakeup:plt-outbox"
            )
        log.info("workers_started", workers=self.names)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Let current passes finish (at most `timeout_s`), then cancel what is left."""
        self._stop.set()
        for worker in self._workers:
            if worker.wake is not None and worker.name in self._tasks:
                worker.wake(self._ctx).set()  # end idle pauses now
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        log.info("workers_stopped", cancelled=len(pending))

    async def _idle_pause(self, worker: Worker) -> float:
        """`interval_s`, or less when the worker knows its next work falls due sooner.

        A failing `due_in` only costs the shortcut: the pause is then `interval_s`."""
        if worker.due_in is None:
            return worker.interval_s
        try:
            due = await worker.due_in(self._ctx)
        except Exception as exc:  # the pass itself reports real trouble; this is a hint
            log.warning("worker_due_in_failed", worker=worker.name, error=repr(exc))
            return worker.interval_s
        return worker.interval_s if due is None else min(worker.interval_s, max(0.0, due))

    async def _supervise(self, worker: Worker) -> None:
        failures = 0
        wake = worker.wake(self._ctx) if worker.wake is not None else None
        while not self._stop.is_set():
            if wake is not None:
                # Cleared before the pass: work committed during it wakes the next one.
                wake.clear()
            try:
                result = await worker.run_once(self._ctx)
                failures = 0
                outcome = "work" if result else "idle"
                metrics.COUNTERS.inc(metrics.WORKER_RUNS, worker=worker.name, outcome=outcome)
                if result:
                    await asyncio.sleep(0)  # let the node breathe between busy passes
                    continue
                pause = await self._idle_pause(worker)
            except Exception as exc:  # a failing pass is retried, never fatal to the node
                failures += 1
                metrics.COUNTERS.inc(metrics.WORKER_RUNS, worker=worker.name, outcome="error")
                pause = min(FAILURE_PAUSE_S_MAX, FAILURE_PAUSE_S_MIN * 2 ** (failures - 1))
                log.error(
                    "worker_pass_failed",
                    worker=worker.name,
                    failures=failures,
                    error=repr(exc),
                    exc_info=exc,
                )
            if self._stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                # `stop` sets the wake events too, so waiting on one of them suffices.
                waiter = wake if wake is not None and not failures else self._stop
                await asyncio.wait_for(waiter.wait(), timeout=pause)
