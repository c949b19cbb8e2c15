"""What both benchmarks share: ports, a durable database, the `pgbench -N` reference, percentiles.

Imported by `grant_cycles.py` and `settlements.py` (run as scripts from `bench/`, so this
module is found beside them).
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg

from nodes.embedded_pg import EmbeddedPostgres, pg_binary

DB = "plt"
OPERATOR_TOKEN = "op-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def create_database(server: EmbeddedPostgres) -> None:
    """A fresh `DB` on `server`, refusing a server without fsync and synchronous commit."""
    admin = await asyncpg.connect(server.dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DB}"')
        settings = {k: await admin.fetchval(f"SHOW {k}") for k in ("fsync", "synchronous_commit")}
    finally:
        await admin.close()
    assert settings == {"fsync": "on", "synchronous_commit": "on"}, settings


def pgbench(server: EmbeddedPostgres, clients: int, seconds: int, scale: int) -> float:
    """`pgbench -N` (simple updates, no branch/teller hot rows) on the same server: the
    physical reference every result is divided by."""
    args = ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]
    exe = str(pg_binary("pgbench"))
    psql = str(pg_binary("psql"))
    subprocess.run(
        [psql, *args, "-q", "-c", "DROP DATABASE IF EXISTS pgbench WITH (FORCE)",
         "-c", "CREATE DATABASE pgbench", "postgres"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [exe, *args, "-i", "-q", "-s", str(scale), "pgbench"], check=True, capture_output=True
    )
    result = subprocess.run(
        [exe, *args, "-N", "-c", str(clients), "-j", "2", "-T", str(seconds), "pgbench"],
        check=True,
        capture_output=True,
        text=True,
    )
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    assert match, result.stdout[-400:]
    return float(match[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def add_node_root_arguments(parser: argparse.ArgumentParser) -> None:
    """`--node-root` / `--node-python`: run another checkout's node (an A/B against a base)."""
    parser.add_argument("--node-root", help="checkout whose node to run (default: this one)")
    parser.add_argument("--node-python", help="its interpreter (default: its .venv)")


def resolve_node_root(args: argparse.Namespace, default_root: Path) -> None:
    """Fill in `args.node_root` and `args.node_python` (the checkout's own venv if it has one)."""
    args.node_root = Path(args.node_root).resolve() if args.node_root else default_root
    venv_python = args.node_root / ".venv/bin/python"
    args.node_python = args.node_python or (
        str(venv_python) if venv_python.exists() else sys.executable
    )
