"""Operator console commands for operations: resolving grants in doubt, reading the audit trail.

    grants resolve TRANSFER_ID --outcome commit|abort --reason "..." --actor NAME [--evidence F]
    audit list [--since 24h|7d|2026-03-16T00:00+08:00] [--subject grant:...] [--action grant.]

Registered on `nodes.cli`'s parser by `register`. Refusals are WalletErrors, printed by
`nodes.cli.main` with their code; the command exits 1 and nothing is changed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError

console = Console()

DETAIL_CHARS_MAX = 120


def _read_evidence(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise WalletError(
            ErrorCode.INVALID_REQUEST, f"cannot read the evidence file: {exc}"
        ) from None


async def grants_resolve(ctx: WalletContext, args: argparse.Namespace) -> int:
    """`grants resolve`: the audited manual resolution of a grant in doubt."""
    from wallet.plt import resolution

    evidence = _read_evidence(args.evidence) if args.evidence else None
    result = await resolution.resolve(
        ctx,
        args.transfer_id,
        outcome=args.outcome,
        reason=args.reason,
        actor=args.actor,
        evidence=evidence,
        side=args.side,
    )
    table = Table("field", "value")
    for name in ("side", "transfer_id", "peer", "state_before", "state_after", "detail"):
        table.add_row(name, escape(str(getattr(result, name))))
    console.print(table)
    console.print("[green]resolved[/green]" if result.changed else "nothing to change")
    return 0


async def audit_list(ctx: WalletContext, args: argparse.Namespace) -> int:
    """`audit list`: the newest events first."""
    from wallet import audit

    since = audit.parse_since(args.since, ctx.clock.now())
    events = await audit.list_events(
        ctx.pool,
        since=since,
        subject=args.subject,
        action_prefix=args.action_prefix,
        limit=args.limit,
    )
    table = Table("id", "at (UTC)", "actor", "action", "subject", "request id", "detail")
    for e in events:
        detail = json.dumps(e.detail, ensure_ascii=False, sort_keys=True)
        if len(detail) > DETAIL_CHARS_MAX:
            detail = detail[: DETAIL_CHARS_MAX - 1] + "…"
        table.add_row(
            str(e.id),
            e.at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            escape(e.actor),
            escape(e.action),
            escape(e.subject or ""),
            escape(e.request_id or ""),
            escape(detail),
        )
    console.print(table)
    console.print(f"{len(events)} event(s) since {since.isoformat()}")
    return 0


def register(
    sub: Any,
    grants_cmd: Any,
    with_ctx: Any,
) -> None:
    """Add the commands to `plt-node`'s parser (`with_ctx` opens the node's context)."""
    resolve = grants_cmd.add_parser(
        "resolve", help="resolve a grant in doubt as the protocol would (audited)"
    )
    resolve.add_argument("transfer_id")
    resolve.add_argument("--outcome", required=True, choices=["commit", "abort"])
    resolve.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    resolve.add_argument("--actor", required=True, help="who is resolving it")
    resolve.add_argument(
        "--evidence",
        help="signed evidence: the grant's receipt (at A, for a commit repair) or A's "
        "DECISION envelope or a receipt (at B); at B without it, A is asked now",
    )
    resolve.add_argument(
        "--side", choices=["giver", "receiver"], help="only if the id is known on both sides"
    )
    resolve.set_defaults(run=with_ctx(grants_resolve))

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True
    )
    listing = audit.add_parser("list", help="audit events, newest first")
    listing.add_argument("--since", default="24h", help="30m, 24h, 7d or an ISO date/time")
    listing.add_argument("--subject", help="e.g. person:42, grant:<transfer id>, institution:H1")
    listing.add_argument(
        "--action", dest="action_prefix", help="an action or its prefix, e.g. grant."
    )
    listing.add_argument("--limit", type=int, default=200)
    listing.set_defaults(run=with_ctx(audit_list))
