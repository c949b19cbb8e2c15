"""A province as a cluster, in containers: node replicas behind a load balancer, on a primary
PostgreSQL with a synchronous standby (docs/operations.md, "Running a province as a cluster").

`ClusterNetwork` runs one province (`cluster`) as

* `pg-a`, the primary (`synchronous_standby_names = 'FIRST 1 (pg_b)'`), and `pg-b`, its
  standby copied with pg_basebackup and streaming from it (containers/postgres);
* `replicas` node containers (`replica-a`, `replica-b`, ...) sharing one data volume (keys,
  pepper, directory: every replica signs as the same node), each with `DATABASE_URL` naming
  both servers and connecting to the writable one;
* HAProxy (containers/balancer) in front of them, known to the other provinces as the
  province's node (`node-13` on the link network) and to the tests on its published port.

Every other province is one node and one database, as in `ContainerNetwork`. Faults are
real: `kill_replica` and `kill_primary` are SIGKILL; `promote_standby` is `pg_ctl promote`,
what an operator (or Patroni) does. Everything is removed by `close()`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from testcontainers.core.container import DockerContainer

from tests.containers.harness import (
    NODE_PORT,
    OPERATOR,
    PG_DB,
    PG_PASSWORD,
    PG_PORT,
    PG_USER,
    Box,
    ContainerNetwork,
    Province,
    _free_port,
    wait_for,
)

BALANCER_IMAGE = os.environ.get("PLTC_BALANCER_IMAGE", "plt-balancer:local")
STANDBY_NAME = "pg_b"


@dataclass
class Replicas:
    """A clustered province's node: its replicas and the balancer in front of them. Enough of
    a container for the harness (`get_logs`, `get_wrapped_container`)."""

    nodes: list[DockerContainer]
    ports: list[int]
    balancer: DockerContainer

    def get_logs(self) -> tuple[bytes, bytes]:
        """Every replica's log lines, merged in time order (OTPs are read from them)."""
        stamped: list[bytes] = []
        for node in self.nodes:
            if node._container is None:
                continue
            logs = node.get_wrapped_container().logs(stdout=True, stderr=True, timestamps=True)
            stamped.extend(line for line in logs.splitlines() if line)
        stamped.sort(key=lambda line: line.split(b" ", 1)[0])
        return b"\n".join(line.split(b" ", 1)[-1] for line in stamped) + b"\n", b""

    def get_wrapped_container(self) -> Any:
        return self.balancer.get_wrapped_container()

    def url(self, replica: int) -> str:
        """One replica's own address (not through the balancer)."""
        return f"http://127.0.0.1:{self.ports[replica]}"


@dataclass
class ClusterNetwork(ContainerNetwork):
    """Provinces as containers, one of them (`cluster`) as a cluster."""

    cluster: str = "prov-13"
    replicas: int = 2
    standby: DockerContainer | None = field(default=None, init=False)
    standby_port: int = field(default=0, init=False)

    def _add_province(self, province: Province, local: Any, exchange: str) -> Box:
        if province.node_id != self.cluster:
            return super()._add_province(province, local, exchange)
        primary, primary_port = self._database(
            province,
            local,
            "pg-a",
            PG_APPLICATION_NAME="pg_a",
            PG_SYNC_STANDBY_NAMES=f"FIRST 1 ({STANDBY_NAME})",
        )
        standby, self.standby_port = self._database(
            province, local, "pg-b", PG_APPLICATION_NAME=STANDBY_NAME, PG_PRIMARY_HOST="pg-a"
        )
        self.standby = standby
        self.extra.append((f"pg-b-{province.short}", standby))
        data = f"{self.tag}-data-{province.short}"
        self.client.volumes.create(data)
        self._volumes.append(data)
        dsn = f"postgresql://{PG_USER}:{PG_PASSWORD}@pg-a:{PG_PORT},pg-b:{PG_PORT}/{PG_DB}"
        nodes, ports = [], []
        for i in range(self.replicas):
            alias = f"replica-{chr(ord('a') + i)}"
            node, port = self._node(province, local, alias, dsn, exchange, data_volume=data)
            nodes.append(node)
            ports.append(port)
            self.extra.append((f"{alias}-{province.short}", node))
        balancer = DockerContainer(BALANCER_IMAGE).with_env(
            "BALANCER_BACKENDS", ",".join(f"{n._name}:{NODE_PORT}" for n in nodes)
        )
        balancer.with_name(f"{self.tag}-balancer-{province.short}")
        balancer_port = _free_port()
        balancer.ports[f"{NODE_PORT}/tcp"] = ("127.0.0.1", balancer_port)  # type: ignore[assignment]
        balancer.with_kwargs(**self._on(local, "balancer"))
        self.extra.append((f"balancer-{province.short}", balancer))
        return Box(province, Replicas(nodes, ports, balancer), primary, balancer_port, primary_port)

    def _before_nodes(self) -> None:
        """The standby copies the healthy primary; nodes start once it streams (a commit on
        the primary waits for it)."""
        assert self.standby is not None
        self.standby.start()
        self._wait_healthy("the standby", self.standby)

    def _start_node(self, box: Box) -> None:
        if not isinstance(box.node, Replicas):
            super()._start_node(box)
            return
        for node in box.node.nodes:
            node.start()  # on the link network too, to send to the other provinces
            self._link.connect(node.get_wrapped_container())
        box.node.balancer.start()
        self._link.connect(
            box.node.balancer.get_wrapped_container(), aliases=[f"node-{box.province.short}"]
        )

    def _wait_healthy(self, what: str, container: DockerContainer) -> None:
        def healthy() -> bool:
            inspect = self.client.api.inspect_container(container.get_wrapped_container().id)
            return bool(inspect["State"].get("Health", {}).get("Status") == "healthy")

        wait_for(what, healthy, 120)

    # -- the cluster --

    @property
    def members(self) -> Replicas:
        replicas = self.boxes[self.cluster].node
        assert isinstance(replicas, Replicas)
        return replicas

    def kill_replica(self, replica: int) -> None:
        """SIGKILL one replica (its PID 1): no shutdown of any kind."""
        container = self.members.nodes[replica].get_wrapped_container()
        container.kill(signal="SIGKILL")
        container.wait(timeout=30)

    def start_replica(self, replica: int) -> None:
        self.members.nodes[replica].get_wrapped_container().start()
        self.healed_at = time.monotonic()
        url = self.members.url(replica)
        wait_for(
            f"replica {replica} to be ready",
            lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200,
            120,
        )

    def kill_primary(self) -> None:
        """SIGKILL the clustered province's primary PostgreSQL (crash, no shutdown)."""
        container = self.boxes[self.cluster].pg.get_wrapped_container()
        container.kill(signal="SIGKILL")
        container.wait(timeout=30)

    def promote_standby(self) -> None:
        """`pg_ctl promote` on the standby (what Patroni or the on-call person does); it is
        the province's database from now on, for the nodes and for the checker."""
        assert self.standby is not None
        result = self.standby.get_wrapped_container().exec_run(
            ["pg_ctl", "promote", "-w", "-D", "/var/lib/postgresql/data"], user="postgres"
        )
        assert result.exit_code == 0, result.output.decode()
        box = self.boxes[self.cluster]
        # The old primary stays listed for close(); the standby is now the province's `pg`.
        self.extra = [(label, c) for label, c in self.extra if c is not self.standby]
        self.extra.append((f"pg-a-{box.province.short}", box.pg))
        box.pg, box.pg_port = self.standby, self.standby_port
        self.healed_at = time.monotonic()

    def standby_state(self) -> str | None:
        """The standby's `sync_state` as the primary reports it ('sync' when commits wait)."""
        result = (
            self.boxes[self.cluster]
            .pg.get_wrapped_container()
            .exec_run(
                [
                    "psql",
                    "-U",
                    PG_USER,
                    "-d",
                    PG_DB,
                    "-tAc",
                    "SELECT sync_state FROM pg_stat_replication "
                    f"WHERE application_name = '{STANDBY_NAME}'",
                ]
            )
        )
        return result.output.decode().strip() or None

    def scrape(self, replica: int) -> dict[str, float]:
        """One replica's /metrics, as {'name{labels}': value}."""
        response = httpx.get(f"{self.members.url(replica)}/metrics", headers=OPERATOR, timeout=15)
        assert response.status_code == 200, response.text
        samples: dict[str, float] = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples
