"""What both benchmarks share: ports, a durable database, the `pgbench -N` reference, percentiles.

Imported by `grant_cycles.py` and `settlements.py` (run as scripts from `bench/`, so this
module is found beside them).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg

from nodes.embedded_pg import EmbeddedPostgres, pg_binary

DB = "plt"
OPERATOR_TOKEN = "op-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


# --- /proc -------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def peak_rss_kb(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]))
        except OSError:
            continue
    return out


def postmaster_pid(server: EmbeddedPostgres) -> int:
    return int((server.pgdata / "postmaster.pid").read_text().split()[0])


# --- pg_stat_statements (`--statements`) ---------------------------------------------------------

STATEMENT_TEXT = 150  # characters of each statement shown (QW=... in the environment: more)
STATEMENTS_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
}
_TOP_STATEMENTS = """
SELECT calls, total_exec_time, rows, regexp_replace(query, '\\s+', ' ', 'g') AS query
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)
ORDER BY total_exec_time DESC
"""


async def statements_reset(dsn: str) -> None:
    """Start counting: the warm-up's statements are not the run's."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset(), pg_stat_reset()")
    finally:
        await conn.close()


async def print_statements(dsn: str, count: int, unit: str, top: int, label: str = "") -> None:
    """What the database executed per `unit` (a settlement, a cycle) over `count` of them:
    statements (a pipelined one counts once; trigger and function statements too, with
    `track = all`), transactions, and the `top` statements by server time."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_TOP_STATEMENTS, DB)
        commits = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", DB
        )
    finally:
        await conn.close()
    n = max(count, 1)
    calls = sum(r["calls"] for r in rows)
    exec_ms = sum(r["total_exec_time"] for r in rows)
    width = int(os.environ.get("QW", STATEMENT_TEXT))
    print(
        f"{label}statements: {calls / n:.1f} per {unit}, {commits / n:.1f} transactions, "
        f"{exec_ms / n:.3f} ms executing; the {top} costliest:"
    )
    for r in rows[:top]:
        print(
            f"  {r['calls'] / n:5.2f}/{unit} {r['total_exec_time'] / n:6.3f} ms "
            f"{r['rows'] / max(1, r['calls']):6.1f} rows  {r['query'][:width]}"
        )
