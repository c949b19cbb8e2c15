"""The operator console through its real commands (`nodes.cli.main`), against the nodes'
own databases and keys on disk, while the network runs: resolving grants in doubt and
reading the audit trail.

The console runs on the system clock (today), the network on its ManualClock (March 2026):
to the console every grant of the network is long past its 06:00 deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from nodes import cli, console_ops
from nodes.network import LocalNetwork, LocalNode
from tests.network.grant_flow import (
    A,
    B,
    Pair,
    check_books,
    expect_money,
    grant,
    linked_pair,
    set_clock,
    states,
)
from tests.network.test_grant_resolution import _committed_at_a_only
from wallet.clock import ManualClock
from wallet.plt import node as plt_node

pytestmark = pytest.mark.network


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


def console_config(tmp_path: Path, network: LocalNetwork, node: LocalNode) -> str:
    """A settings file for `plt-node` on `node`: its database, keys and peer directory."""
    folder = tmp_path / node.node_id
    node.keys.save(folder / "keys")
    others = [n for n in network.nodes.values() if n is not node]
    plt_node.write_directory(
        folder / "directory",
        [o.keys.peer_entry(o.url) for o in others],
        {o.province.code: o.node_id for o in others},
    )
    config = folder / "node.toml"
    config.write_text(
        f'province_code = "{node.province.code}"\n'
        f'node_id = "{node.node_id}"\n'
        f'database_url = "{node.database_url}"\n'
        f'keys_dir = "{folder / "keys"}"\n'
        f'directory_dir = "{folder / "directory"}"\n'
        'log_level = "WARNING"\n',
        encoding="utf-8",
    )
    return str(config)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tables as on a wide terminal, so a test reads whole cells; afterwards, logging as it
    was (`cli.main` configures structlog onto this test's captured standard error)."""
    monkeypatch.setattr(console_ops.console, "width", 250)
    monkeypatch.setattr(cli.console, "width", 250)
    yield
    structlog.reset_defaults()


async def plt_node_cli(config: str, *args: str) -> int:
    code: int = await asyncio.to_thread(cli.main, ["--config", config, *args])
    return code


async def test_grants_resolve_at_a_then_the_audit_trail_shows_it(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str], net_clock: ManualClock
) -> None:
    config = console_config(tmp_path, pair.network, pair.a)
    tid = await grant(pair, 80_000)
    resolve = ["grants", "resolve", tid, "--reason", "OPS-9 stuck grant", "--actor", "ops-wang"]
    capsys.readouterr()

    assert await plt_node_cli(config, *resolve, "--outcome", "commit") == 1
    err = capsys.readouterr().err
    assert "state_conflict" in err and "--evidence" in err
    assert await states(pair, tid) == ("PREPARED_A", "PENDING_ACCEPT")

    assert await plt_node_cli(config, *resolve, "--outcome", "abort") == 0
    out = capsys.readouterr().out
    assert "PREPARED_A" in out and "ABORTED" in out and "resolved" in out
    # The DECISION was queued at the console's (system) time: bring the network there.
    await set_clock(pair, net_clock, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    await pair.network.run_senders()
    assert await states(pair, tid) == ("ABORTED", "ABORTED")
    await expect_money(pair, giver=500_000)

    assert await plt_node_cli(config, *resolve, "--outcome", "commit") == 1
    assert "would contradict it" in capsys.readouterr().err.replace("\n", " ")

    listing = ["audit", "list", "--since", "3650d", "--subject", f"grant:{tid}", "--limit", "5"]
    assert await plt_node_cli(config, *listing, "--action", "grant.resolve") == 0
    out = capsys.readouterr().out
    assert "grant.resolve" in out and "ops-wang" in out and "cli-" in out
    assert "1 event(s)" in out
    # The money movements of the grant are on its trail too: held, then returned.
    assert await plt_node_cli(config, *listing) == 0
    out = capsys.readouterr().out
    assert "grant.hold" in out and "grant.abort" in out and "3 event(s)" in out
    assert await plt_node_cli(config, "audit", "list", "--since", "yesterday-ish") == 1
    assert "since" in capsys.readouterr().err


async def test_grants_resolve_at_b_asks_a_for_its_signed_decision(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = console_config(tmp_path, pair.network, pair.b)
    tid, _ = await _committed_at_a_only(pair)
    resolve = ["grants", "resolve", tid, "--reason", "OPS-10 ACCEPTED for hours", "--actor", "li"]
    capsys.readouterr()
    assert await plt_node_cli(config, *resolve, "--outcome", "abort") == 1
    assert f"{A} signed COMMIT" in capsys.readouterr().err.replace("\n", " ")
    assert await states(pair, tid) == ("COMMITTED", "ACCEPTED")
    assert await plt_node_cli(config, *resolve, "--outcome", "commit") == 0
    assert await states(pair, tid) == ("COMMITTED", "COMMITTED")
    assert B in pair.network.nodes
    await pair.network.run_senders()
    await expect_money(pair, giver=420_000, frozen=80_000, quota=80_000)
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    assert await plt_node_cli(config, "audit", "list", "--since", since, "--action", "grant.") == 0
    assert "grant.resolve" in capsys.readouterr().out
