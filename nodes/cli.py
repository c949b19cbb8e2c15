"""The operator console: `plt-node <command>` (or `python -m nodes <command>`).

Commands act on this node's own database (the settings say which), never through another
credential: the operator's access to the database is the operator's credential here.

    serve                         run the node's HTTP API
    migrate                       apply pending migrations and exit
    demo                          a local node with demo data and a scripted walk through it
    roster import FILE            import insured persons (CSV or JSON), with a progress bar
    person status ID STATUS       change an insured person's status
    credits post FILE             post a monthly credit batch (--batch-id, --month)
    institution add               register a hospital, clinic, pharmacy or agency
    relationships pending         relationships waiting for operator review
    relationships approve|reject  decide one
    ledger check                  verify the books (balanced, nothing overdrawn)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from nodes.app import create_app, open_context
from nodes.logging import configure_logging
from nodes.settings import Settings, SettingsError, load_settings
from wallet.context import WalletContext
from wallet.errors import WalletError

console = Console()
err_console = Console(stderr=True)

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _with_ctx(action: Callable[[WalletContext, argparse.Namespace], Awaitable[int]]) -> Command:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        async with open_context(settings) as ctx:
            return await action(ctx, args)

    return run


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
    )
    await uvicorn.Server(config).serve()
    return 0


async def _migrate(ctx: WalletContext, args: argparse.Namespace) -> int:
    # open_context has already migrated; say where we stand.
    version = await ctx.pool.fetchval("SELECT max(version) FROM schema_migration")
    console.print(f"database at migration {version:04d}")
    return 0


async def _roster_import(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import roster

    rows = roster.parse_roster_file(Path(args.file))
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("importing", total=len(rows))
        result = await roster.import_rows(ctx, rows, progress=lambda n: progress.advance(task, n))
    console.print(f"created {result.created}, updated {result.updated}")
    return 0


async def _person_status(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import roster

    view = await roster.set_status(ctx, args.id_number, args.status, actor=args.actor)
    console.print(f"status is now {view.status}")
    return 0


async def _credits_post(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import credits

    rows = credits.parse_credit_file(Path(args.file))
    result = await credits.post_batch(ctx, args.batch_id, args.month, rows)
    verb = "posted" if result.created else "already posted (identical batch)"
    console.print(
        f"batch {result.batch_id} {verb}: {result.row_count} credits, {_yuan(result.total_fen)}"
    )
    return 0


async def _institution_add(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import institutions

    view, api_key = await institutions.register(
        ctx,
        code=args.code,
        name=args.name,
        kind=args.kind,
        categories=args.category,
        actor=args.actor,
    )
    console.print(f"registered {view.code} ({view.kind}); API key, shown only now:")
    console.print(api_key, highlight=False, soft_wrap=True)
    return 0


async def _relationships_pending(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import relationships

    pending = await relationships.list_pending_review(ctx)
    table = Table("id", "giver", "receiver", "type", "evidence", "filed at")
    for r in pending:
        table.add_row(
            str(r.id),
            r.giver_name_masked,
            r.receiver_name_masked,
            r.relation_type,
            r.evidence_ref,
            str(r.filed_at),
        )
    console.print(table)
    return 0


async def _relationships_decide(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import relationships

    view = await relationships.review(
        ctx, args.id, approve=args.decision == "approve", actor=args.actor
    )
    console.print(f"relationship {view.id} is now {view.state}")
    return 0


async def _ledger_check(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet.ledger import check_books

    async with ctx.pool.acquire() as conn:
        books = await check_books(conn)
    table = Table("check", "value")
    table.add_row("accounts", str(books.accounts))
    table.add_row("transfers", str(books.transfers))
    table.add_row(
        "debits posted = credits posted",
        f"{books.total_debits_posted} = {books.total_credits_posted}",
    )
    table.add_row(
        "debits pending = credits pending",
        f"{books.total_debits_pending} = {books.total_credits_pending}",
    )
    table.add_row("overdrawn accounts", str(books.overdrawn_accounts or "none"))
    table.add_row(
        "accounts not matching transfers", str(books.accounts_not_matching_transfers or "none")
    )
    console.print(table)
    console.print("[green]balanced[/green]" if books.balanced else "[red]NOT BALANCED[/red]")
    return 0 if books.balanced else 1


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from nodes.demo import run_demo

    return await run_demo(settings, console)


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plt-node", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (TOML); else PLT_CONFIG")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the HTTP API").set_defaults(run=cmd_serve)
    sub.add_parser("migrate", help="apply migrations").set_defaults(run=_with_ctx(_migrate))
    sub.add_parser("demo", help="local node, demo data, scripted walk").set_defaults(run=cmd_demo)

    roster = sub.add_parser("roster").add_subparsers(dest="action", required=True)
    imp = roster.add_parser("import", help="import insured persons from CSV or JSON")
    imp.add_argument("file")
    imp.set_defaults(run=_with_ctx(_roster_import))

    person = sub.add_parser("person").add_subparsers(dest="action", required=True)
    status = person.add_parser("status", help="change an insured person's status")
    status.add_argument("id_number")
    status.add_argument("status", choices=["normal", "suspended", "terminated", "deceased"])
    status.add_argument("--actor", default="operator-cli")
    status.set_defaults(run=_with_ctx(_person_status))

    credits = sub.add_parser("credits").add_subparsers(dest="action", required=True)
    post = credits.add_parser("post", help="post a monthly credit batch")
    post.add_argument("file")
    post.add_argument("--batch-id", required=True)
    post.add_argument("--month", required=True, help="YYYY-MM")
    post.set_defaults(run=_with_ctx(_credits_post))

    inst = sub.add_parser("institution").add_subparsers(dest="action", required=True)
    add = inst.add_parser("add", help="register a designated institution")
    add.add_argument("--code", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=["hospital", "clinic", "pharmacy", "agency"])
    add.add_argument(
        "--category",
        action="append",
        required=True,
        help="a settlement category it may charge (repeat)",
    )
    add.add_argument("--actor", default="operator-cli")
    add.set_defaults(run=_with_ctx(_institution_add))

    rel = sub.add_parser("relationships").add_subparsers(dest="action", required=True)
    rel.add_parser("pending", help="awaiting review").set_defaults(
        run=_with_ctx(_relationships_pending)
    )
    for decision in ("approve", "reject"):
        p = rel.add_parser(decision, help=f"{decision} a relationship under review")
        p.add_argument("id", type=int)
        p.add_argument("--actor", default="operator-cli")
        p.set_defaults(run=_with_ctx(_relationships_decide), decision=decision)

    ledger = sub.add_parser("ledger").add_subparsers(dest="action", required=True)
    ledger.add_parser("check", help="verify the books").set_defaults(run=_with_ctx(_ledger_check))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        err_console.print(f"[red]settings:[/red] {exc}")
        return 2
    configure_logging(settings.log_level, settings.log_format)
    run: Command = args.run
    try:
        return asyncio.run(run(args, settings))
    except WalletError as exc:
        extra: dict[str, Any] = exc.extensions
        where = f" (line {extra['line']})" if "line" in extra else ""
        err_console.print(f"[red]{exc.code.value}[/red]{where}: {exc.detail}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
