"""docker-compose.yml itself: brought up with the machine's Compose (v2 `docker compose`, else
Debian's docker-compose 1.29), Hebei as a cluster (two replicas behind HAProxy, a primary
with a synchronous standby) beside two single-node provinces; one grant from Hebei to
Shanghai over HTTP, the checker over the three databases, then torn down with its volumes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.containers.cluster import BALANCER_IMAGE
from tests.containers.conftest import ROOT, tier_required
from tests.containers.flow import (
    accept,
    balance,
    credit,
    enrol,
    grant,
    link,
    wait_decided,
    wait_offered,
)
from tests.containers.harness import (
    NODE_IMAGE,
    PG_IMAGE,
    PROVINCES,
    START_TIMEOUT_S,
    Box,
    ContainerNetwork,
    _free_port,
    far_expiry_hour,
    wait_for,
)

pytestmark = pytest.mark.containers

COMPOSE_TIMEOUT_S = 300


def compose_command() -> list[str] | None:
    """`docker compose` (v2) if the plugin is there, else `docker-compose` (1.29), else None."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


class ComposeProject:
    """docker-compose.yml under its own project name, on free 127.0.0.1 ports."""

    def __init__(self, command: list[str]) -> None:
        self.name = f"plt-compose-{uuid.uuid4().hex[:6]}"
        self.ports = {p.node_id: _free_port() for p in PROVINCES}
        self.pg_ports = {p.node_id: _free_port() for p in PROVINCES}
        self.env = {
            "PLTC_NODE_IMAGE": NODE_IMAGE,
            "PLTC_PG_IMAGE": PG_IMAGE,
            "PLTC_BALANCER_IMAGE": BALANCER_IMAGE,
            "PLTC_PG_PORT_13_STANDBY": str(_free_port()),
            "PLTC_OPERATOR_TOKEN": "op-container-token",
            "PLTC_PG_PASSWORD": "plt-container-pw",
            "PLTC_GRANT_BLACKOUT_START_HOUR": "0",
            "PLTC_GRANT_BLACKOUT_END_HOUR": "0",
            "PLTC_GRANT_EXPIRY_HOUR": str(far_expiry_hour()),
            **{f"PLTC_PORT_{p.short}": str(self.ports[p.node_id]) for p in PROVINCES},
            **{f"PLTC_PG_PORT_{p.short}": str(self.pg_ports[p.node_id]) for p in PROVINCES},
        }
        self.base = [*command, "-p", self.name, "-f", str(ROOT / "docker-compose.yml")]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.base, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT_S,
            check=False,
        )
        assert result.returncode == 0, f"compose {' '.join(args)} failed:\n{result.stderr[-3000:]}"
        return result

    def down(self) -> None:
        logs = subprocess.run(
            [*self.base, "logs", "--no-color"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out = Path("data") / "containers" / "logs"
        out.mkdir(parents=True, exist_ok=True)
        (out / "compose.log").write_text(logs.stdout + logs.stderr)
        self.run("down", "-v", "--remove-orphans", "--timeout", "10")


@pytest.fixture(scope="module")
def compose(request: pytest.FixtureRequest, container_tier: None) -> Iterator[ComposeProject]:
    command = compose_command()
    if command is None:
        reason = "neither `docker compose` nor `docker-compose` is installed"
        if tier_required():
            pytest.fail(f"the compose test must run in CI but cannot: {reason}", pytrace=False)
        pytest.skip(f"compose test skipped: {reason}")
    project = ComposeProject(command)
    request.addfinalizer(project.down)
    project.run("up", "-d")
    yield project


def test_compose_brings_up_three_provinces_and_a_grant_commits(compose: ComposeProject) -> None:
    # The harness's readers and the checker, on the project's published ports only.
    net = ContainerNetwork(name="compose")
    # Hebei's node is its two replicas (OTPs are in their logs); the others are one service.
    services = {"prov-13": ["node-13-a", "node-13-b"]}
    for province in PROVINCES:
        net.boxes[province.node_id] = Box(
            province,
            node=_ComposeContainer(
                compose, *services.get(province.node_id, [f"node-{province.short}"])
            ),
            pg=_ComposeContainer(compose, f"pg-{province.short}"),
            node_port=compose.ports[province.node_id],
            pg_port=compose.pg_ports[province.node_id],
        )
    for node_id, box in net.boxes.items():
        wait_for(f"{node_id} (compose) to be ready", box.ready, START_TIMEOUT_S, every_s=1.0)
    assert asyncio.run(standby_state(net.boxes["prov-13"].dsn)) == [("pg_13_b", "sync")]

    giver = enrol(net, "prov-13", 201, "张三丰")
    credit(giver, 200_000)
    receiver = enrol(net, "prov-31", 601, "李小龙", scheme="resident")
    relation_id = link(giver, receiver)
    transfer_id = grant(giver, relation_id, 80_000)
    wait_offered(receiver, transfer_id)
    accept(receiver, transfer_id)

    assert wait_decided(giver, transfer_id) == "COMMITTED"
    assert balance(giver) == 120_000
    check = net.wait_consistent()
    assert (check.funded_fen, check.customer_fen, check.clearing_fen) == (200_000, 200_000, 0)
    assert dict(check.grant_states()) == {"COMMITTED": 1}
    net.client.close()


async def standby_state(dsn: str) -> list[tuple[str, str]]:
    """The standbys a primary streams to, and whether its commits wait for them."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT application_name, sync_state FROM pg_stat_replication")
    finally:
        await conn.close()
    return [(r["application_name"], r["sync_state"]) for r in rows]


class _ComposeContainer:
    """Enough of a container for the harness's readers: the services' logs via compose,
    merged in time order (a clustered province's replicas each log their own requests)."""

    def __init__(self, project: ComposeProject, *services: str) -> None:
        self.project = project
        self.services = services

    def get_logs(self) -> tuple[bytes, bytes]:
        result = self.project.run(
            "logs", "--no-color", "--no-log-prefix", "--timestamps", *self.services
        )
        stamped = sorted(
            (line for line in result.stdout.splitlines() if line),
            key=lambda line: line.split(" ", 1)[0],
        )
        merged = "\n".join(line.split(" ", 1)[-1] for line in stamped) + "\n"
        return merged.encode(), result.stderr.encode()
