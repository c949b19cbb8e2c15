"""Several province nodes in one process, talking real HTTP on 127.0.0.1 (DESIGN test tier 3).

    async with LocalNetwork(admin_dsn=..., clock=ManualClock(...)) as net:
        a, b = net["prov-13"], net["prov-31"]
        ...                                # drive them over HTTP (a.url, b.url)
        await net.run_senders()            # deliver every outbox, deterministically
        await net.stop_node("prov-31")     # a crash/restart test: the database stays
        await net.start_node("prov-31")

Each node has its own database on ONE PostgreSQL server: the one at `admin_dsn`, else the
server of `DATABASE_URL`, else an embedded server started here. Each node gets fresh keys
(or, with `persist=True`, the keys kept under `data_dir`), and its directory lists every
other node with its URL and pinned root key; peers' key sets are installed up front, as a
deployment would have fetched them once. The uvicorn servers run as tasks on the caller's
event loop, so tests can reach each node's `WalletContext` directly (`node.ctx`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import uvicorn
from litestar import Litestar

from nodes.app import create_app
from nodes.db import ensure_database
from nodes.embedded_pg import EmbeddedPostgres
from nodes.settings import Settings
from protocol.directory import PeerDirectory
from wallet.clock import Clock, SystemClock
from wallet.context import OtpSender, WalletContext
from wallet.credentials import PEPPER_BYTES, PEPPER_FILE, Pepper, create_pepper, load_pepper
from wallet.otp import RecordingOtpSender
from wallet.plt import transport
from wallet.plt.node import NodeKeys, PltNode
from wallet.plt.transport import EPOCH, SendReport

START_TIMEOUT_S = 30.0
SENDER_ROUNDS_MAX = 20


@dataclass(frozen=True)
class Province:
    """One province node of the network: its GB/T 2260 code and registry id."""

    code: str
    node_id: str

    @property
    def default_port(self) -> int:
        # 8013 for 130000 (Hebei), 8031 for 310000 (Shanghai): easy to remember locally.
        return 8000 + int(self.code[:2])


DEFAULT_PROVINCES = (
    Province("130000", "prov-13"),
    Province("310000", "prov-31"),
    Province("510000", "prov-51"),
)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner (several run in one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class LocalNode:
    """One running (or stopped) province node of a LocalNetwork."""

    province: Province
    port: int
    database_url: str
    keys: NodeKeys
    directory: PeerDirectory
    otp: OtpSender
    settings: Settings
    pepper: Pepper | None = None
    app: Litestar | None = None
    server: _QuietServer | None = None
    task: asyncio.Task[None] | None = None

    @property
    def node_id(self) -> str:
        return self.province.node_id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def ctx(self) -> WalletContext:
        """The running node's context (its pool lives on this event loop)."""
        if self.app is None or not self.running:
            raise RuntimeError(f"{self.node_id} is not running")
        ctx: WalletContext = self.app.state.ctx
        return ctx

    @property
    def plt(self) -> PltNode:
        plt = self.ctx.plt
        assert plt is not None
        return plt


@dataclass
class LocalNetwork:
    """Province nodes on loopback ports, each with its own database on one server."""

    provinces: Sequence[Province] = DEFAULT_PROVINCES
    admin_dsn: str | None = None
    # A migrated database to copy for each node (fast); without it each node migrates.
    template: str | None = None
    data_dir: Path = field(default_factory=lambda: Path("data") / "network")
    clock: Clock = field(default_factory=SystemClock)
    workers: bool = False
    # Keep keys and databases across runs (the `plt-node network` command).
    persist: bool = False
    fixed_ports: bool = False
    scrypt_n: int | None = None
    operator_token: str = "op-local-network"
    otp_factory: Callable[[], OtpSender] = RecordingOtpSender
    nodes: dict[str, LocalNode] = field(default_factory=dict)
    _server: EmbeddedPostgres | None = None
    _created: list[str] = field(default_factory=list)

    def __getitem__(self, node_id: str) -> LocalNode:
        return self.nodes[node_id]

    async def __aenter__(self) -> LocalNetwork:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- lifecycle --

    async def start(self) -> None:
        """Create the databases and keys, wire the directories, start every node."""
        admin = self._admin_dsn()
        now_ms = _ms(self.clock)
        ports = [p.default_port if self.fixed_ports else _free_port() for p in self.provinces]
        # Databases are made concurrently: most of a node's start is PostgreSQL copying files.
        databases = await asyncio.gather(*(self._database(admin, p) for p in self.provinces))
        for province, port, database_url in zip(self.provinces, ports, databases, strict=True):
            keys = self._keys(province, now_ms)
            self.nodes[province.node_id] = LocalNode(
                province=province,
                port=port,
                database_url=database_url,
                keys=keys,
                directory=PeerDirectory([]),
                otp=self.otp_factory(),
                settings=self._settings(province, port, database_url),
                pepper=self._pepper(province),
            )
        for node in self.nodes.values():
            node.directory = self._directory_for(node)
        try:
            await asyncio.gather(*(self.start_node(node_id) for node_id in self.nodes))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every node; drop the databases made here (unless persisting) and the server."""
        await asyncio.gather(*(self.stop_node(node_id) for node_id in list(self.nodes)))
        if self._created and self.admin_dsn is not None and not self.persist:
            await asyncio.gather(*(_drop(self.admin_dsn, name) for name in self._created))
        self._created.clear()
        if self._server is not None:
            self._server.stop()
            self._server = None

    async def start_node(self, node_id: str) -> LocalNode:
        """(Re)start one node on its port with its database and keys as they are."""
        node = self.nodes[node_id]
        if node.running:
            return node
        plt = PltNode(node.keys, node.directory, regions=self.regions)
        node.app = create_app(
            node.settings,
            clock=self.clock,
            otp_sender=node.otp,
            scrypt_n=self.scrypt_n,
            plt=plt,
            password_pepper=node.pepper,
        )
        config = uvicorn.Config(
            node.app,
            host="127.0.0.1",
            port=node.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        node.server = _QuietServer(config)
        node.task = asyncio.create_task(node.server.serve(), name=f"node:{node_id}")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not node.server.started:
            if node.task.done():
                node.task.result()  # raises the startup error, if any
                raise RuntimeError(f"{node_id} stopped during startup")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{node_id} did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.01)
        return node

    async def stop_node(self, node_id: str) -> None:
        """Stop one node (graceful: in-flight requests finish); its database stays."""
        node = self.nodes[node_id]
        if node.server is not None and node.task is not None:
            node.server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await node.task
        node.server = node.task = None

    # -- operations for tests and demos --

    async def run_senders(self, rounds: int = SENDER_ROUNDS_MAX) -> SendReport:
        """Run every running node's outbox sender until nothing is due anywhere."""
        total = SendReport()
        for _ in range(rounds):
            this_round = SendReport()
            for node in self.nodes.values():
                if node.running:
                    this_round.add(await transport.run_once(node.ctx))
            total.add(this_round)
            if this_round.claimed == 0:
                break
        return total

    def rotate_keys(self, node_id: str, *, activate_after_ms: int = 0) -> NodeKeys:
        """Give a node a new signing key (active after `activate_after_ms`); peers learn it
        by fetching its key set on the first unknown key id."""
        node = self.nodes[node_id]
        node.keys = node.keys.rotated(_ms(self.clock), activate_after_ms=activate_after_ms)
        if node.running:
            node.plt.keys = node.keys
        return node.keys

    def revoke_key(self, node_id: str, kid: str) -> NodeKeys:
        """Revoke a node's key from now on; peers refuse it once they refresh its key set."""
        node = self.nodes[node_id]
        node.keys = node.keys.revoked(kid, _ms(self.clock))
        if node.running:
            node.plt.keys = node.keys
        return node.keys

    @property
    def regions(self) -> dict[str, str]:
        return {n.province.code: n.node_id for n in self.nodes.values()}

    # -- helpers --

    def _admin_dsn(self) -> str:
        if self.admin_dsn is None and os.environ.get("DATABASE_URL"):
            self.admin_dsn = os.environ["DATABASE_URL"]
        if self.admin_dsn is None:
            self._server = EmbeddedPostgres(self.data_dir / "postgres").start()
            self.admin_dsn = self._server.dsn()
        return self.admin_dsn

    async def _database(self, admin_dsn: str, province: Province) -> str:
        name = f"plt_{province.node_id.replace('-', '_')}"
        if not self.persist:
            name = f"{name}_{uuid.uuid4().hex[:10]}"
            admin = await asyncpg.connect(admin_dsn)
            try:
                template = f' TEMPLATE "{self.template}"' if self.template else ""
                await admin.execute(f'CREATE DATABASE "{name}"{template}')
            finally:
                await admin.close()
            self._created.append(name)
        else:
            await ensure_database(admin_dsn, name)
        return _with_database(admin_dsn, name)

    def _keys(self, province: Province, now_ms: int) -> NodeKeys:
        if not self.persist:
            return NodeKeys.generate(province.node_id, now_ms)
        keys_dir = self.data_dir / province.node_id / "keys"
        if (keys_dir / "keyset.json").exists():
            return NodeKeys.load(keys_dir)
        keys = NodeKeys.generate(province.node_id, now_ms)
        keys.save(keys_dir)
        return keys

    def _pepper(self, province: Province) -> Pepper:
        """The node's password pepper: in memory, or a file beside its keys when persisting."""
        if not self.persist:
            return Pepper(secrets.token_bytes(PEPPER_BYTES))
        path = self.data_dir / province.node_id / "keys" / PEPPER_FILE
        return load_pepper(path) or create_pepper(path)

    def _directory_for(self, node: LocalNode) -> PeerDirectory:
        others = [n for n in self.nodes.values() if n.node_id != node.node_id]
        directory = PeerDirectory([o.keys.peer_entry(o.url) for o in others])
        for other in others:
            directory.install(other.node_id, other.keys.document)
        return directory

    def _settings(self, province: Province, port: int, database_url: str) -> Settings:
        return Settings(
            province_code=province.code,
            node_id=province.node_id,
            database_url=database_url,
            data_dir=str(self.data_dir),
            db_pool_min=1,
            db_pool_max=10,
            port=port,
            operator_token=self.operator_token,
            workers_enabled=self.workers,
            public_url=f"http://127.0.0.1:{port}",
        )


async def _drop(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def _ms(clock: Clock) -> int:
    return (clock.now() - EPOCH) // dt.timedelta(milliseconds=1)


def describe(network: LocalNetwork) -> list[dict[str, Any]]:
    """One line per node, for the console."""
    return [
        {
            "node": n.node_id,
            "province": n.province.code,
            "url": n.url,
            "kid": n.keys.keyset.signing_kid(_ms(network.clock)),
            "running": n.running,
        }
        for n in network.nodes.values()
    ]
