"""Province nodes as Docker containers (DESIGN test tier: separate machines).

`ContainerNetwork` runs each province as two containers from the locally built images
(containers/build-images.sh): its PostgreSQL with its own volume, and its node. A
province's node and database share a private Docker network (its ports published on
127.0.0.1 only: tests reach containers through them and nothing else); the nodes also
share one link network, so a node can be cut off from the other provinces and keep its
database. Keys are made and the peer directory provisioned by the node image's own
entrypoint on first start, from an exchange volume (public entries only).

Faults are real: `kill_node` is SIGKILL, `stop_database` stops PostgreSQL, `pause_node`
freezes every process of the node, `disconnect_node` removes it from the link network.
Everything made here is removed by `close()`, which the fixtures call in finalizers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import docker
import httpx
from docker.types import EndpointConfig
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from nodes.checker import NetworkCheck, check_network

NODE_IMAGE = os.environ.get("PLTC_NODE_IMAGE", "plt-node:local")
PG_IMAGE = os.environ.get("PLTC_PG_IMAGE", "plt-postgres:15")
OPERATOR_TOKEN = "op-container-token"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
PG_USER, PG_PASSWORD, PG_DB = "plt", "plt-container-pw", "plt"
NODE_PORT, PG_PORT = 8000, 5432
START_TIMEOUT_S = 120.0
HEAL_TIMEOUT_S = 60.0  # nothing may be left in doubt 60 s after healing
LOG_DIR = Path("data") / "containers" / "logs"
SHANGHAI = ZoneInfo("Asia/Shanghai")

# No registry here: Ryuk (testcontainers' reaper image) cannot be pulled; finalizers clean up.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
testcontainers_config.ryuk_disabled = True

T = TypeVar("T")


@dataclass(frozen=True)
class Province:
    code: str
    node_id: str

    @property
    def short(self) -> str:
        return self.code[:2]


PROVINCES = (
    Province("130000", "prov-13"),
    Province("310000", "prov-31"),
    Province("510000", "prov-51"),
)


def wait_for(
    what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.25
) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what}; last: {last!r}"
            )
        time.sleep(every_s)


def far_expiry_hour() -> int:
    """A grant expiry hour about 12 hours away, so no grant expires during a test."""
    return (dt.datetime.now(SHANGHAI).hour + 12) % 24


def rules_env(expiry_hour: int | None = None) -> dict[str, str]:
    """Rules for container tests: no blackout (tests run at any hour), many grants a day."""
    return {
        "PLT_RULES__GRANT_BLACKOUT_START_HOUR": "0",
        "PLT_RULES__GRANT_BLACKOUT_END_HOUR": "0",
        "PLT_RULES__GRANTS_PER_GIVER_PER_DAY": "100",
        "PLT_RULES__GRANT_EXPIRY_HOUR": str(
            far_expiry_hour() if expiry_hour is None else expiry_hour
        ),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Box:
    """One province: its node container and its database container."""

    province: Province
    # testcontainers' DockerContainer; for the compose test, anything with get_logs().
    node: Any
    pg: Any
    node_port: int
    pg_port: int

    @property
    def node_id(self) -> str:
        return self.province.node_id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node_port}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_DB}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15)

    def node_logs(self) -> str:
        out, err = self.node.get_logs()
        return (out + err).decode("utf-8", "replace")

    def ready(self) -> bool:
        with self.http() as http:
            return http.get("/ready").status_code == 200


@dataclass
class ContainerNetwork:
    """Provinces as containers; one set of Docker networks and volumes per instance."""

    name: str
    provinces: tuple[Province, ...] = PROVINCES
    node_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    boxes: dict[str, Box] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tag = f"plt-{self.name}-{uuid.uuid4().hex[:6]}"
        self.client = docker.from_env()
        self._networks: list[Any] = []
        self._volumes: list[str] = []
        # Containers beyond each province's node and database (replicas, balancers, standbys).
        self.extra: list[tuple[str, DockerContainer]] = []
        # When the last fault was healed (monotonic): the checker's deadline counts from it.
        self.healed_at: float | None = None

    def __getitem__(self, node_id: str) -> Box:
        return self.boxes[node_id]

    # -- lifecycle --

    def start(self) -> ContainerNetwork:
        """Start every database, then every node; wait until each node is ready."""
        link = self.client.networks.create(f"{self.tag}-link", driver="bridge")
        self._networks.append(link)
        exchange = f"{self.tag}-exchange"
        self.client.volumes.create(exchange)
        self._volumes.append(exchange)
        for province in self.provinces:
            local = self.client.networks.create(f"{self.tag}-{province.short}", driver="bridge")
            self._networks.append(local)
            self.boxes[province.node_id] = self._add_province(province, local, exchange)
        for box in self.boxes.values():
            box.pg.start()
        for box in self.boxes.values():
            self.wait_database(box.node_id)
        self._before_nodes()
        for box in self.boxes.values():
            self._start_node(box)
        for box in self.boxes.values():
            self.wait_ready(box.node_id)
        return self

    def _add_province(self, province: Province, local: Any, exchange: str) -> Box:
        """One province as a database and a node (not started yet)."""
        pg, pg_port = self._database(province, local, "pg")
        dsn = f"postgresql://{PG_USER}:{PG_PASSWORD}@pg:{PG_PORT}/{PG_DB}"
        node, node_port = self._node(province, local, "node", dsn, exchange)
        return Box(province, node, pg, node_port, pg_port)

    def _database(
        self, province: Province, local: Any, alias: str, **env: str
    ) -> tuple[DockerContainer, int]:
        """A PostgreSQL container known as `alias` on the province's network, and its port."""
        pg = DockerContainer(PG_IMAGE).with_envs(
            POSTGRES_USER=PG_USER, POSTGRES_PASSWORD=PG_PASSWORD, POSTGRES_DB=PG_DB, **env
        )
        pg.with_name(f"{self.tag}-{alias}-{province.short}")
        port = _free_port()
        pg.ports[f"{PG_PORT}/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
        pg.with_kwargs(**self._on(local, alias))
        return pg, port

    def _node(
        self,
        province: Province,
        local: Any,
        alias: str,
        database_url: str,
        exchange: str,
        data_volume: str | None = None,
    ) -> tuple[DockerContainer, int]:
        """A node container known as `alias` on the province's network, and its port."""
        peers = [p.node_id for p in self.provinces if p != province]
        node = DockerContainer(NODE_IMAGE).with_envs(
            PLT_NODE_ID=province.node_id,
            PLT_PROVINCE_CODE=province.code,
            DATABASE_URL=database_url,
            PLT_PUBLIC_URL=f"http://node-{province.short}:{NODE_PORT}",
            PLT_OPERATOR_TOKEN=OPERATOR_TOKEN,
            PROVISION_PEER_NODES=",".join(peers),
            **rules_env(),
        )
        node.with_envs(**self.node_env.get(province.node_id, {}))
        node.with_name(f"{self.tag}-{alias}-{province.short}")
        port = _free_port()
        node.ports[f"{NODE_PORT}/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
        node.with_volume_mapping(exchange, "/exchange", "rw")
        if data_volume is not None:
            node.with_volume_mapping(data_volume, "/var/lib/plt", "rw")
        node.with_kwargs(**self._on(local, alias))
        return node, port

    def _before_nodes(self) -> None:
        """Called once every database is healthy, before any node starts (a hook)."""

    def _start_node(self, box: Box) -> None:
        """Start the province's node and put it on the link network as `node-<short>`."""
        box.node.start()
        self._link.connect(box.node.get_wrapped_container(), aliases=[f"node-{box.province.short}"])

    def _on(self, local: Any, alias: str) -> dict[str, Any]:
        """docker create arguments: on the province's network, known there as `alias`."""
        endpoint = EndpointConfig(self.client.api._version, aliases=[alias])
        return {
            "network": local.name,
            "networking_config": {local.name: endpoint},
            "labels": {"plt.test": self.tag},
        }

    @property
    def _link(self) -> Any:
        """The network the nodes meet on (made first)."""
        return self._networks[0]

    def _containers(self) -> list[tuple[str, DockerContainer]]:
        """Every container made here, with a label for its log file."""
        found = []
        for box in self.boxes.values():
            for kind, container in (("node", box.node), ("pg", box.pg)):
                if isinstance(container, DockerContainer):
                    found.append((f"{kind}-{box.province.short}", container))
        return found + self.extra

    def close(self, *, keep_logs_as: str | None = None) -> None:
        """Remove every container, network and volume made here (logs are kept on disk).

        Each removal is attempted even if an earlier one failed; failures are reported."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        failures: list[str] = []

        def attempt(what: str, action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as exc:  # cleanup goes on; the failure is reported below
                failures.append(f"{what}: {exc}")

        for label, container in self._containers():
            if container._container is None:  # never created
                continue
            log_file = LOG_DIR / f"{keep_logs_as or self.name}-{label}.log"
            attempt(
                f"logs of {label}",
                lambda c=container, f=log_file: f.write_bytes(b"".join(c.get_logs())),
            )
            attempt(f"removing {label}", container.stop)
        for network in self._networks:
            attempt(f"removing network {network.name}", network.remove)
        for volume in self._volumes:
            attempt(
                f"removing volume {volume}",
                lambda v=volume: self.client.volumes.get(v).remove(force=True),
            )
        self.client.close()
        if failures:
            print("container cleanup left something behind:\n" + "\n".join(failures))

    # -- waiting --

    def wait_database(self, node_id: str, timeout_s: float = START_TIMEOUT_S) -> None:
        box = self.boxes[node_id]

        def healthy() -> bool:
            inspect = self.client.api.inspect_container(box.pg.get_wrapped_container().id)
            return bool(inspect["State"].get("Health", {}).get("Status") == "healthy")

        wait_for(f"{node_id}'s database", healthy, timeout_s)

    def wait_ready(self, node_id: str, timeout_s: float = START_TIMEOUT_S) -> None:
        box = self.boxes[node_id]

        def ready() -> bool:
            state = self.client.api.inspect_container(box.node.get_wrapped_container().id)["State"]
            if state["Status"] == "exited":
                raise AssertionError(f"{node_id} exited:\n{box.node_logs()[-3000:]}")
            return box.ready()

        wait_for(f"{node_id} to be ready", ready, timeout_s)

    # -- faults and healing --

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node's process (PID 1): no shutdown of any kind."""
        container = self.boxes[node_id].node.get_wrapped_container()
        container.kill(signal="SIGKILL")
        container.wait(timeout=30)

    def start_node(self, node_id: str) -> None:
        self.boxes[node_id].node.get_wrapped_container().start()
        self.healed_at = time.monotonic()
        self.wait_ready(node_id)

    def stop_database(self, node_id: str) -> None:
        self.boxes[node_id].pg.get_wrapped_container().stop(timeout=10)

    def start_database(self, node_id: str) -> None:
        self.boxes[node_id].pg.get_wrapped_container().start()
        self.healed_at = time.monotonic()
        self.wait_database(node_id)

    def pause_node(self, node_id: str) -> None:
        self.boxes[node_id].node.get_wrapped_container().pause()

    def unpause_node(self, node_id: str) -> None:
        self.boxes[node_id].node.get_wrapped_container().unpause()
        self.healed_at = time.monotonic()

    def disconnect_node(self, node_id: str) -> None:
        """Cut the node off from every other province (it keeps its own database)."""
        self._link.disconnect(self.boxes[node_id].node.get_wrapped_container())

    def connect_node(self, node_id: str) -> None:
        box = self.boxes[node_id]
        self._link.connect(box.node.get_wrapped_container(), aliases=[f"node-{box.province.short}"])
        self.healed_at = time.monotonic()

    # -- reading --

    def otp_code(self, node_id: str, phone: str, purpose: str, seen: int) -> str:
        """The code the node's `log` OTP sender wrote for `phone` after `seen` earlier ones."""
        masked = phone[:3] + "*" * (len(phone) - 7) + phone[-4:]

        def codes() -> list[str]:
            found = []
            for line in self.boxes[node_id].node_logs().splitlines():
                if '"otp_sent"' not in line:
                    continue
                event = json.loads(line)
                if event.get("phone") == masked and event.get("purpose") == purpose:
                    found.append(str(event["otp_code"]))
            return found if len(found) > seen else []

        return wait_for(f"an OTP for {masked} in {node_id}'s log", codes, 15)[-1]

    def otp_count(self, node_id: str, phone: str, purpose: str) -> int:
        masked = phone[:3] + "*" * (len(phone) - 7) + phone[-4:]
        return sum(
            1
            for line in self.boxes[node_id].node_logs().splitlines()
            if '"otp_sent"' in line and f'"phone": "{masked}"' in line and purpose in line
        )

    def dsns(self) -> dict[str, str]:
        return {node_id: box.dsn for node_id, box in self.boxes.items()}

    def check(self, *, at_rest: bool = True) -> NetworkCheck:
        """The bank-style checker over every province's database (nodes.checker)."""
        return asyncio.run(check_network(self.dsns(), at_rest=at_rest))

    def wait_consistent(self, timeout_s: float = HEAL_TIMEOUT_S) -> NetworkCheck:
        """Poll the checker until every grant is final and every ledger agrees, at most
        `timeout_s` after the last healing (or from now, if nothing was healed)."""
        start = self.healed_at if self.healed_at is not None else time.monotonic()
        last: list[NetworkCheck] = []

        def consistent() -> NetworkCheck | None:
            check = self.check()
            last[:] = [check]
            return check if check.ok else None

        try:
            check = wait_for(
                "a consistent network",
                consistent,
                max(start + timeout_s - time.monotonic(), 0.0),
                every_s=1.0,
            )
        except AssertionError:
            problems = last[0].problems if last else ["no check ran"]
            raise AssertionError(
                f"not consistent {timeout_s} s after healing:\n" + "\n".join(problems)
            ) from None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with (LOG_DIR / "timings.txt").open("a") as out:
            out.write(f"{self.name}: consistent {time.monotonic() - start:.1f} s after healing\n")
        self.healed_at = None
        return check
