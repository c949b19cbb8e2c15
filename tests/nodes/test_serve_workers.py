"""`plt-node serve --workers 2`: the parent starts the embedded PostgreSQL and migrates
once; two worker processes answer on one port; stopping the parent stops them and the
server it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _python_children(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"python" in cmdline and b"resource_tracker" not in cmdline:
            out.append(child)
    return out


def test_two_worker_processes_share_the_port_and_one_embedded_server(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLT_") and k != "DATABASE_URL"}
    env.update(
        PLT_DATA_DIR=str(tmp_path),
        PLT_PORT=str(port),
        PLT_WORKERS_ENABLED="false",
        PLT_LOG_LEVEL="WARNING",
        PLT_DB_POOL_MIN="1",
        PLT_DB_POOL_MAX="2",
    )
    log = (tmp_path / "serve.log").open("wb")
    parent = subprocess.Popen(
        [sys.executable, "-m", "nodes", "serve", "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    pgdata = tmp_path / "prov-13" / "postgres" / "pgdata"
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and not ready:
            assert parent.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        workers = _python_children(parent.pid)
        assert len(workers) == 2
        # One embedded server, started by the parent (a child of the parent's process
        # tree would be a second postmaster; pg_ctl detaches, so look at its pid file).
        assert (pgdata / "postmaster.pid").exists()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert all(http.get("/health").status_code == 200 for _ in range(20))
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0
        log.close()
    assert not (pgdata / "postmaster.pid").exists()
