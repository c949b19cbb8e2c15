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
    keys init|rotate|revoke|show  this node's PLT/1 keys (root key, signing keys, key set)
    directory add-peer|show       the peer directory: other provinces' nodes and root keys
    network                       a local network of provinces on embedded PostgreSQL
    grants in-doubt               grants undecided past their time, or decided but unacknowledged
    grants resolve ID             resolve one as the protocol would (audited; --outcome, --reason)
    audit list                    the audit trail (--since, --subject, --action)
    receipt verify FILE           check a grant receipt offline against pinned root keys
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from nodes import console_clearing, console_ops
from nodes.app import create_app, open_context
from nodes.logging import configure_logging
from nodes.settings import Settings, SettingsError, load_settings
from wallet.context import WalletContext
from wallet.errors import WalletError

if TYPE_CHECKING:
    from wallet.plt.node import NodeKeys

console = Console()
err_console = Console(stderr=True)

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def _with_ctx(action: Callable[[WalletContext, argparse.Namespace], Awaitable[int]]) -> Command:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        async with open_context(settings) as ctx:
            return await action(ctx, args)

    return run


def serve(settings: Settings, config_path: str | None) -> int:
    """Run the HTTP API: one process, or `settings.workers` processes sharing the port.

    uvloop and httptools are used when installed (they are dependencies): the node is
    CPU-bound on its event loop, and they take a good part of the HTTP and socket work off
    it. With several workers the parent starts the embedded PostgreSQL (if no URL is set)
    and migrates once, then hands the DSN to the workers through `DATABASE_URL`."""
    import uvicorn

    from nodes.db import prepare_database

    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "loop": "auto",
        "http": "auto",
    }
    if settings.workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(settings), **common)).run()
        return 0
    dsn, server = asyncio.run(prepare_database(settings))
    try:
        os.environ["DATABASE_URL"] = dsn
        if config_path:
            os.environ["PLT_CONFIG"] = config_path
        uvicorn.run(
            "nodes.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            timeout_graceful_shutdown=10,
            **common,
        )
    finally:
        if server is not None:
            server.stop()
    return 0


async def _migrate(ctx: WalletContext, args: argparse.Namespace) -> int:
    # open_context has already migrated; say where we stand.
    version = await ctx.pool.fetchval("SELECT max(version) FROM schema_migration")
    console.print(f"database at migration {version:04d}")
    return 0


async def _roster_import(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import roster

    found = roster.read_roster_file(Path(args.file))
    rows = found.rows
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("importing", total=len(rows))
        result = await roster.import_rows(
            ctx,
            rows,
            progress=lambda n: progress.advance(task, n),
            lines=found.lines,  # refusals found later (pooling region) name the file's line
            actor=args.actor,
        )
    console.print(f"created {result.created}, updated {result.updated}")
    if result.created:
        from nodes.db import analyze

        await analyze(ctx.pool, ("insured_person", "account", "wallet"))
    return 0


async def _person_status(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import roster

    view = await roster.set_status(ctx, args.id_number, args.status, actor=args.actor)
    console.print(f"status is now {view.status}")
    return 0


async def _credits_post(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet import credits

    found = credits.read_credit_file(Path(args.file))
    result = await credits.post_batch(
        ctx, args.batch_id, args.month, found.rows, lines=found.lines, actor=args.actor
    )
    if result.created:
        from nodes.db import analyze

        await analyze(ctx.pool, ("account", "ledger_transfer"))
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


# --- PLT/1 keys and directory (files only: no database) ---------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    try:
        keys = _keys_action(args, settings)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:  # KeysNotFound, bad kid
        err_console.print(f"[red]keys:[/red] {escape(str(exc))}")
        return 1
    _print_keys(keys, settings.plt_public_url)
    return 0


def _keys_action(args: argparse.Namespace, settings: Settings) -> NodeKeys:
    from protocol.errors import UnknownKey
    from wallet.credentials import create_pepper, load_pepper
    from wallet.plt import node as plt_node

    keys_dir = settings.plt_keys_dir
    if args.action == "init":
        keys = plt_node.init_keys(keys_dir, settings.node_id, _now_ms(), overwrite=args.force)
        console.print(f"created keys for {keys.node_id} in {keys_dir}")
        # The payment-password pepper lives beside the keys; never replaced (`--force` too):
        # a new pepper would lock every holder out of their password.
        if load_pepper(settings.password_pepper_path) is None:
            create_pepper(settings.password_pepper_path)
            console.print(f"created the password pepper {settings.password_pepper_path}")
    elif args.action == "rotate":
        keys = plt_node.rotate(
            keys_dir, _now_ms(), activate_after_ms=int(args.activate_after_hours * 3_600_000)
        )
        console.print(f"added a key; key set is now seq {keys.keyset.seq}")
    elif args.action == "revoke":
        try:
            keys = plt_node.revoke(keys_dir, args.kid, _now_ms())
        except UnknownKey as exc:
            raise ValueError(exc.message) from None
        console.print(f"revoked {args.kid}; key set is now seq {keys.keyset.seq}")
    else:
        keys = plt_node.NodeKeys.load(keys_dir)
    return keys


def _print_keys(keys: NodeKeys, public_url: str) -> None:
    import msgspec

    table = Table()
    for column in ("kid", "public key", "not before (ms)", "not after (ms)", "revoked at (ms)"):
        table.add_column(column, overflow="fold")
    for record in keys.keyset.keys:
        table.add_row(
            record.kid,
            record.ed25519_pub,
            str(record.not_before_ms),
            str(record.not_after_ms or ""),
            str(record.revoked_at_ms or ""),
        )
    console.print(table)
    console.print("peer entry for other nodes' peers.json (pins this node's root key):")
    console.print(
        msgspec.json.encode(keys.peer_entry(public_url)).decode(), highlight=False, soft_wrap=True
    )


async def cmd_directory(args: argparse.Namespace, settings: Settings) -> int:
    import msgspec

    from protocol.directory import Peer
    from wallet.plt import node as plt_node

    folder = settings.plt_directory_dir
    peers: list[Peer] = []
    regions: dict[str, str] = {}
    if (folder / "peers.json").exists():
        peers = msgspec.json.decode((folder / "peers.json").read_bytes(), type=list[Peer])
    regions = plt_node.load_regions(folder)
    if args.action == "add-peer":
        entry = {"node": args.node, "url": args.url, "root_kid": args.root_kid}
        try:
            peer = msgspec.convert({**entry, "root_pub": args.root_pub}, Peer)
        except msgspec.ValidationError as exc:
            err_console.print(f"[red]invalid peer:[/red] {escape(str(exc))}")
            return 2
        peers = [p for p in peers if p.node != peer.node] + [peer]
        if args.province:
            regions[args.province] = peer.node
        plt_node.write_directory(folder, peers, regions)
        console.print(f"{peer.node} at {peer.url} added to {folder}")
    table = Table("node", "url", "root kid", "province")
    by_node = {v: k for k, v in regions.items()}
    for p in peers:
        table.add_row(p.node, p.url, p.root_kid, by_node.get(p.node, ""))
    console.print(table)
    return 0


async def cmd_network(args: argparse.Namespace, settings: Settings) -> int:
    from nodes.network import DEFAULT_PROVINCES, LocalNetwork, Province, describe
    from wallet.otp import LogOtpSender

    provinces = DEFAULT_PROVINCES[: args.provinces]
    if args.province:
        provinces = tuple(Province(*item.split(":", 1)) for item in args.province)
    network = LocalNetwork(
        provinces=provinces,
        data_dir=Path(settings.data_dir) / "network",
        workers=True,
        persist=True,
        fixed_ports=True,
        operator_token=settings.operator_token or "op-local-network",
        otp_factory=LogOtpSender,
    )
    async with network:
        table = Table("node", "province", "url", "signing key")
        for line in describe(network):
            table.add_row(line["node"], line["province"], line["url"], line["kid"])
        console.print(table)
        console.print(f"operator token: {network.operator_token}   (Ctrl-C stops the network)")
        await asyncio.Event().wait()
    return 0


async def _grants_in_doubt(ctx: WalletContext, args: argparse.Namespace) -> int:
    from wallet.plt import grants

    rows = await grants.in_doubt(ctx)
    table = Table("side", "transfer", "peer", "state", "amount", "since", "why")
    for r in rows:
        amount = "" if r.amount_fen is None else _yuan(r.amount_fen)
        table.add_row(r.side, r.transfer_id, r.peer, r.state, amount, str(r.since), r.why)
    console.print(table)
    console.print(f"{len(rows)} grant(s) in doubt")
    return 0 if not rows else 3


async def cmd_receipt_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Offline: no database, no network. Trust anchors: a peers.json (--peers, else the
    node's directory) and this node's own root key."""
    from wallet.plt import node as plt_node
    from wallet.plt import receipts

    peers = Path(args.peers) if args.peers else settings.plt_directory_dir / "peers.json"
    roots: dict[str, tuple[str, str]] = {}
    if peers.exists():
        roots.update(receipts.load_root_keys(peers.read_bytes()))
    try:
        own = plt_node.NodeKeys.load(settings.plt_keys_dir)
        roots.setdefault(own.node_id, (own.root.kid, own.root.public_b64))
    except FileNotFoundError:
        pass
    try:
        verdict = receipts.verify_receipt_file(args.file, roots)
    except OSError as exc:
        err_console.print(f"[red]receipt:[/red] {escape(str(exc))}")
        return 2
    table = Table("field", "value")
    names = ("transfer_id", "giver_node", "receiver_node", "amount_fen", "outcome")
    for name in (*names, "giver_auth", "receiver_auth"):  # device:<kid> is a checked signature
        table.add_row(name, str(getattr(verdict, name)))
    console.print(table)
    for problem in verdict.problems:
        console.print(f"[red]-[/red] {escape(problem)}")
    console.print("[green]VALID[/green]" if verdict.valid else "[red]INVALID[/red]")
    return 0 if verdict.valid else 1


async def cmd_check_network(args: argparse.Namespace, settings: Settings) -> int:
    """Read every province's database (one --db NODE=DSN each) and check them together."""
    from nodes.checker import check_network, describe

    dsns: dict[str, str] = {}
    for item in args.db:
        node, sep, dsn = item.partition("=")
        if not sep or not node or not dsn:
            err_console.print(f"[red]--db:[/red] expected NODE=DSN, got {escape(item)}")
            return 2
        dsns[node] = dsn
    check = await check_network(dsns, at_rest=not args.in_flight)
    table = Table("check", "value")
    for name, value in describe(check):
        table.add_row(name, value)
    console.print(table)
    for problem in check.problems:
        console.print(f"[red]-[/red] {escape(problem)}")
    console.print("[green]CONSISTENT[/green]" if check.ok else "[red]NOT CONSISTENT[/red]")
    return 0 if check.ok else 1


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plt-node", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (TOML); else PLT_CONFIG")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_parser = sub.add_parser("serve", help="run the HTTP API")
    serve_parser.add_argument(
        "--workers", type=int, help="HTTP worker processes (else the `workers` setting)"
    )
    serve_parser.set_defaults(run=None)
    sub.add_parser("migrate", help="apply migrations").set_defaults(run=_with_ctx(_migrate))
    sub.add_parser("demo", help="local node, demo data, scripted walk").set_defaults(run=cmd_demo)

    roster = sub.add_parser("roster").add_subparsers(dest="action", required=True)
    imp = roster.add_parser("import", help="import insured persons from CSV or JSON")
    imp.add_argument("file")
    imp.add_argument("--actor", default="operator-cli")
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
    post.add_argument("--actor", default="operator-cli")
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

    keys = sub.add_parser("keys", help="this node's PLT/1 keys").add_subparsers(
        dest="action", required=True
    )
    init = keys.add_parser("init", help="create the root key and a first signing key")
    init.add_argument("--force", action="store_true", help="replace existing keys")
    rotate = keys.add_parser("rotate", help="add a signing key (PROTOCOL b.11)")
    rotate.add_argument(
        "--activate-after-hours", type=float, default=24.0, help="sign with it after (24)"
    )
    revoke = keys.add_parser("revoke", help="revoke a compromised signing key now")
    revoke.add_argument("kid")
    keys.add_parser("show", help="the key set and this node's peer entry")
    for p in (init, rotate, revoke, keys.choices["show"]):
        p.set_defaults(run=cmd_keys)

    directory = sub.add_parser("directory", help="the peer directory").add_subparsers(
        dest="action", required=True
    )
    add_peer = directory.add_parser("add-peer", help="list a peer node and pin its root key")
    add_peer.add_argument("--node", required=True, help="registry id, e.g. prov-31")
    add_peer.add_argument("--url", required=True, help="base URL, e.g. https://plt.sh.example")
    add_peer.add_argument("--root-kid", required=True)
    add_peer.add_argument("--root-pub", required=True, help="base64url Ed25519 public key")
    add_peer.add_argument("--province", help="GB/T 2260 code the peer serves, e.g. 310000")
    directory.add_parser("show", help="list the peers")
    for p in (add_peer, directory.choices["show"]):
        p.set_defaults(run=cmd_directory)

    network = sub.add_parser("network", help="a local multi-province network (embedded PostgreSQL)")
    network.add_argument("--provinces", type=int, default=3, choices=[2, 3])
    network.add_argument(
        "--province",
        action="append",
        metavar="CODE:NODE",
        help="a province to run instead of the defaults, e.g. 440000:prov-44 (repeat)",
    )
    network.set_defaults(run=cmd_network)

    grants_cmd = sub.add_parser("grants", help="cross-province grants").add_subparsers(
        dest="action", required=True
    )
    grants_cmd.add_parser("in-doubt", help="grants an operator should look at").set_defaults(
        run=_with_ctx(_grants_in_doubt)
    )
    console_ops.register(sub, grants_cmd, _with_ctx)  # grants resolve, audit list
    receipt = sub.add_parser("receipt", help="grant receipts").add_subparsers(
        dest="action", required=True
    )
    verify = receipt.add_parser("verify", help="check a receipt offline")
    verify.add_argument("file", help="the receipt JSON (GET /app/v1/grants/{id}/receipt)")
    verify.add_argument("--peers", help="peers.json with the pinned root keys to trust")
    verify.set_defaults(run=cmd_receipt_verify)
    check = sub.add_parser("check-network", help="bank-style check over every province's database")
    check.add_argument(
        "--db",
        action="append",
        required=True,
        metavar="NODE=DSN",
        help="e.g. prov-13=postgresql://...",
    )
    check.add_argument(
        "--in-flight", action="store_true", help="traffic may be moving: skip the at-rest checks"
    )
    check.set_defaults(run=cmd_check_network)
    console_clearing.register(sub, _with_ctx)  # statements, reconcile, clearing
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        err_console.print(f"[red]settings:[/red] {exc}")
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # One request id per command: its log lines and audit events carry it.
    structlog.contextvars.bind_contextvars(request_id=f"cli-{uuid.uuid4().hex[:16]}")
    if args.command == "serve":  # runs its own event loop(s)
        if args.workers is not None:
            if args.workers < 1:
                err_console.print("[red]settings:[/red] --workers must be at least 1")
                return 2
            settings = msgspec.structs.replace(settings, workers=args.workers)
        return serve(settings, args.config)
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
