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
