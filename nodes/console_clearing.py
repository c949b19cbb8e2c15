"""Operator console: reconciliation statements and the monthly clearing (`plt-node ...`).

    statements send                      close ready windows, queue and deliver their STATEMENTs
    statements show [--peer] [--month]   windows, their states and both statements' totals
    reconcile --peer NODE [--window W]   compare with a peer, drill down, list what differs
    clearing run --month YYYY-MM         clear a month (once), send USAGE to the giver nodes
    clearing report --month YYYY-MM      net per pair of provinces: --format table|json|csv
    clearing settle --month YYYY-MM      mark the month's windows SETTLED (payments made)

Exit codes: 0 done (and, for reconcile, everything agrees), 1 refused or differences found.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from wallet.context import WalletContext
from wallet.plt import clearing, statements, transport
from wallet.plt.clearing import ClearingReport

console = Console()
Action = Callable[[WalletContext, argparse.Namespace], Awaitable[int]]
WithCtx = Callable[[Action], Any]

REPORT_COLUMNS = (
    "month",
    "node_a",
    "node_b",
    "a_owes_b_fen",
    "b_owes_a_fen",
    "net_payer",
    "net_payee",
    "net_fen",
    "complete",
    "status",
)


def _yuan(fen: int | None) -> str:
    if fen is None:
        return "-"
    sign = "-" if fen < 0 else ""
    return f"{sign}¥{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


async def _deliver(ctx: WalletContext) -> None:
    """Try the outbox once now (a running node's sender worker would do it anyway)."""
    if ctx.plt is not None:
        report = await transport.run_once(ctx)
        console.print(f"sent: {report.delivered} delivered, {report.failed} to retry")


# --- statements --------------------------------------------------------------------------------


async def _statements_send(ctx: WalletContext, args: argparse.Namespace) -> int:
    closed = await statements.run_once(ctx, full=True)
    console.print(f"{closed} window(s) closed and stated")
    await _deliver(ctx)
    return 0


async def _statements_show(ctx: WalletContext, args: argparse.Namespace) -> int:
    windows = await statements.list_windows(ctx, args.peer, args.month)
    table = Table(title=f"reconciliation windows at {ctx.node_id}")
    for column in ("peer", "window", "state", "ours", "theirs", "differing buckets", "clearing"):
        table.add_column(column)
    for w in windows:
        ours = "-" if w.our_count is None else f"{w.our_count} / {_yuan(w.our_sum_fen)}"
        theirs = "-" if w.peer_count is None else f"{w.peer_count} / {_yuan(w.peer_sum_fen)}"
        buckets = ", ".join(str(b) for b in w.differing_buckets) or "-"
        table.add_row(w.peer, w.window_id, w.state, ours, theirs, buckets, w.clearing_month or "-")
    console.print(table)
    return 0


async def _reconcile(ctx: WalletContext, args: argparse.Namespace) -> int:
    with _progress() as progress:
        task = progress.add_task(f"reconciling with {args.peer}", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        reports = await statements.reconcile(ctx, args.peer, args.window, progress=step)
    if not reports:
        console.print(f"nothing to reconcile with {args.peer}: every closed window agrees")
        return 0
    table = Table(title=f"reconciliation {ctx.node_id} <-> {args.peer}")
    for column in ("window", "state", "transfer", "giver", ctx.node_id, args.peer, "our evidence"):
        table.add_column(column)
    clean = True
    for r in reports:
        if r.problem is not None:
            clean = False
            table.add_row(r.window_id, r.state, f"[yellow]{r.problem}[/yellow]", "", "", "", "")
        elif not r.differences:
            table.add_row(r.window_id, r.state, "agrees", "", "", "", "")
            clean = clean and r.state != "CLOSED"
        for d in r.differences:
            clean = False
            table.add_row(
                r.window_id, r.state, d.transfer_id, d.giver, d.ours, d.theirs, d.evidence
            )
    console.print(table)
    return 0 if clean else 1


# --- clearing ----------------------------------------------------------------------------------


async def _clearing_run(ctx: WalletContext, args: argparse.Namespace) -> int:
    with _progress() as progress:
        task = progress.add_task(f"clearing {args.month}", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        run = await clearing.run_clearing(ctx, args.month, actor=args.actor, progress=step)
    table = Table(title=f"clearing {run.month} at {ctx.node_id}: {run.windows} windows")
    table.add_column("giver node")
    table.add_column("receivable", justify="right")
    table.add_column("USAGE parts", justify="right")
    for peer, fen in sorted(run.receivable_fen.items()):
        table.add_row(peer, _yuan(fen), str(run.usage_parts.get(peer, 0)))
    console.print(table)
    await _deliver(ctx)
    return 0


def report_json(report: ClearingReport) -> bytes:
    """The report as JSON (pairs in node order; equal at both nodes of a pair)."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n"


def report_csv(report: ClearingReport) -> str:
    """One CSV row per pair of provinces."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for pair in report.pairs:
        writer.writerow([getattr(pair, c) for c in REPORT_COLUMNS])
    return out.getvalue()


def report_table(report: ClearingReport) -> Table:
    """A readable table of the report."""
    table = Table(title=f"clearing {report.month} as {report.node} books it")
    for column in ("pair", "A owes B", "B owes A", "net", "status"):
        table.add_column(column, justify="right" if "owes" in column else "left")
    for p in report.pairs:
        net = f"{p.net_payer} pays {p.net_payee} {_yuan(p.net_fen)}" if p.net_payer else "even"
        status = "[green]agreed[/green]" if p.complete else f"[yellow]{p.status}[/yellow]"
        table.add_row(
            f"{p.node_a} / {p.node_b}", _yuan(p.a_owes_b_fen), _yuan(p.b_owes_a_fen), net, status
        )
    return table


async def _clearing_report(ctx: WalletContext, args: argparse.Namespace) -> int:
    report = await clearing.clearing_report(ctx, args.month)
    if args.format == "table":
        console.print(report_table(report))
        if not report.cleared:
            console.print(f"[yellow]{ctx.node_id} has not cleared {args.month}[/yellow]")
        return 0
    text = report_json(report).decode() if args.format == "json" else report_csv(report)
    if args.output:
        await asyncio.to_thread(Path(args.output).write_text, text, encoding="utf-8")
        console.print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


async def _clearing_settle(ctx: WalletContext, args: argparse.Namespace) -> int:
    settled = await clearing.settle_month(ctx, args.month, actor=args.actor)
    console.print(f"{settled} window(s) of {args.month} SETTLED")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_ctx: WithCtx) -> None:
    """Add `statements`, `reconcile` and `clearing` to the console's parser."""
    stmt = sub.add_parser("statements", help="reconciliation statements").add_subparsers(
        dest="action", required=True
    )
    stmt.add_parser("send", help="close ready windows and send their statements").set_defaults(
        run=with_ctx(_statements_send)
    )
    show = stmt.add_parser("show", help="windows and their statements")
    show.add_argument("--peer")
    show.add_argument("--month", help="YYYY-MM (or a longer window prefix)")
    show.set_defaults(run=with_ctx(_statements_show))

    rec = sub.add_parser("reconcile", help="compare with a peer and drill down")
    rec.add_argument("--peer", required=True, help="the peer node, e.g. prov-31")
    rec.add_argument("--window", help="one window, e.g. 2026-03-16T10 (default: all open ones)")
    rec.set_defaults(run=with_ctx(_reconcile))

    clr = sub.add_parser("clearing", help="monthly clearing (RULES 16)").add_subparsers(
        dest="action", required=True
    )
    run = clr.add_parser("run", help="clear a month, once")
    run.add_argument("--month", required=True, help="YYYY-MM")
    run.add_argument("--actor", default="operator-cli")
    run.set_defaults(run=with_ctx(_clearing_run))
    report = clr.add_parser("report", help="net per pair of provinces")
    report.add_argument("--month", required=True, help="YYYY-MM")
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.add_argument("--output", help="write JSON or CSV to this file")
    report.set_defaults(run=with_ctx(_clearing_report))
    settle = clr.add_parser("settle", help="the net payments are made: windows SETTLED")
    settle.add_argument("--month", required=True, help="YYYY-MM")
    settle.add_argument("--actor", default="operator-cli")
    settle.set_defaults(run=with_ctx(_clearing_settle))
