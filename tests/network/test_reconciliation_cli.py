"""The operator console against real node databases: `plt-node statements`, `reconcile` and
`clearing`, run through `nodes.cli.main` with a settings file per node (its database, its keys,
a directory naming the peer), while both nodes serve real HTTP.

The console runs on the system clock (2026-11), the nodes on the test's ManualClock: every
March window and the month itself are long over for the console.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from nodes import cli
from nodes.network import LocalNetwork, LocalNode
from protocol.directory import encode_peers
from tests.network.grant_flow import Pair, answer, check_books, grant, linked_pair, set_clock
from tests.network.recon_flow import tamper
from tests.network.test_grants import pay_at_pharmacy, pharmacy_key
from wallet.clock import ManualClock

pytestmark = pytest.mark.network

CST = dt.timezone(dt.timedelta(hours=8))


@pytest.fixture
async def pair(network: LocalNetwork) -> AsyncIterator[Pair]:
    linked = await linked_pair(network)
    yield linked
    await check_books(network)


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """`cli.main` configures structlog onto the sys.stderr of the moment (capsys's, closed
    after the test): put the previous configuration back, after capsys is gone."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def config_for(node: LocalNode, peer: LocalNode, tmp: Path) -> str:
    """A settings file for the console of `node`: its database, keys on disk, the peer."""
    base = tmp / node.node_id
    node.keys.save(base / "keys")
    (base / "directory").mkdir(parents=True)
    (base / "directory" / "peers.json").write_bytes(encode_peers([peer.keys.peer_entry(peer.url)]))
    path = base / "settings.toml"
    path.write_text(
        f'node_id = "{node.node_id}"\n'
        f'province_code = "{node.province.code}"\n'
        f'database_url = "{node.database_url}"\n'
        f'data_dir = "{base}"\n'
        f'keys_dir = "{base / "keys"}"\n'
        f'directory_dir = "{base / "directory"}"\n'
        'log_level = "WARNING"\n',
        encoding="utf-8",
    )
    return str(path)


async def console(config: str, *args: str) -> int:
    code: int = await asyncio.to_thread(cli.main, ["--config", config, *args])
    return code


async def test_statements_reconcile_and_clearing_through_the_console(
    keep_logging: None,
    pair: Pair,
    net_clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)  # the settings file names the database
    monkeypatch.setenv("COLUMNS", "200")
    a_cfg = config_for(pair.a, pair.b, tmp_path)
    b_cfg = config_for(pair.b, pair.a, tmp_path)
    tid = await grant(pair, 100_000)
    assert (await answer(pair, tid)).status_code == 200
    await pair.network.run_senders()
    await pay_at_pharmacy(pair, await pharmacy_key(pair), 30_000, "rx-1")
    await set_clock(pair, net_clock, dt.datetime(2026, 3, 16, 12, 0, tzinfo=CST))
    await tamper(pair.b, "UPDATE grant_in SET amount_fen = 90000 WHERE transfer_id = $1", tid)

    assert await console(a_cfg, "statements", "send") == 0
    assert await console(b_cfg, "statements", "send") == 0
    assert "1 window(s) closed and stated" in capsys.readouterr().out
    assert await console(a_cfg, "statements", "show", "--month", "2026-03") == 0
    shown = capsys.readouterr().out
    assert "2026-03-16T10" in shown and "CLOSED" in shown
    assert "1 / ¥1,000.00" in shown and "1 / ¥900.00" in shown

    # The drill-down names the transfer and both amounts; differences exit 1.
    assert await console(a_cfg, "reconcile", "--peer", "prov-31") == 1
    out = capsys.readouterr().out
    assert tid in out and "COMMIT 100000" in out and "COMMIT 90000" in out
    found = "SELECT ours, theirs, evidence FROM recon_difference WHERE transfer_id = $1"
    assert tuple(await pair.a.ctx.pool.fetchrow(found, tid)) == (
        "COMMIT 100000",
        "COMMIT 90000",
        "our row agrees with the PREPARE and DECISION we hold",
    )
    # B's statements worker drilled down too: its own evidence points at its row.
    assert tuple(await pair.b.ctx.pool.fetchrow(found, tid)) == (
        "COMMIT 90000",
        "COMMIT 100000",
        "our row says 90000, the PREPARE 100000",
    )

    # Clearing refused while a window is not reconciled; nothing booked.
    net_clock.set(dt.datetime(2026, 4, 2, 12, 0, tzinfo=CST))
    assert await console(b_cfg, "clearing", "run", "--month", "2026-03") == 1
    err = capsys.readouterr().err
    assert "state_conflict" in err and "prov-13 2026-03-16T10 (CLOSED)" in err
    assert await pair.b.ctx.pool.fetchval("SELECT count(*) FROM clearing_run") == 0

    await tamper(pair.b, "UPDATE grant_in SET amount_fen = 100000 WHERE transfer_id = $1", tid)
    assert await console(a_cfg, "reconcile", "--peer", "prov-31", "--window", "2026-03-16T10") == 0
    assert "RECONCILED" in capsys.readouterr().out
    assert await console(b_cfg, "reconcile", "--peer", "prov-13") == 0

    assert await console(b_cfg, "clearing", "run", "--month", "2026-03") == 0
    assert await console(a_cfg, "clearing", "run", "--month", "2026-03") == 0
    out = capsys.readouterr().out
    assert "¥300.00" in out  # B's receivable from A
    await pair.network.run_senders()

    reports = {}
    for name, cfg in (("a", a_cfg), ("b", b_cfg)):
        for fmt in ("json", "csv"):
            target = tmp_path / f"{name}.{fmt}"
            args = ["clearing", "report", "--month", "2026-03", "--format", fmt]
            assert await console(cfg, *args, "--output", str(target)) == 0
            reports[name, fmt] = target.read_text(encoding="utf-8")
    a_pairs = json.loads(reports["a", "json"])["pairs"]
    assert a_pairs == json.loads(reports["b", "json"])["pairs"]
    assert a_pairs == [
        {
            "month": "2026-03",
            "node_a": "prov-13",
            "node_b": "prov-31",
            "a_owes_b_fen": 30_000,
            "b_owes_a_fen": 0,
            "net_payer": "prov-13",
            "net_payee": "prov-31",
            "net_fen": 30_000,
            "complete": True,
            "status": "agreed",
        }
    ]
    assert reports["a", "csv"] == reports["b", "csv"]
    assert reports["a", "csv"].splitlines()[1] == (
        "2026-03,prov-13,prov-31,30000,0,prov-13,prov-31,30000,True,agreed"
    )
    capsys.readouterr()
    assert await console(a_cfg, "clearing", "report", "--month", "2026-03") == 0
    assert "prov-13 pays prov-31 ¥300.00" in capsys.readouterr().out

    # Twice: refused with the reason; a bad month: refused.
    assert await console(b_cfg, "clearing", "run", "--month", "2026-03") == 1
    assert "month 2026-03 is already cleared" in capsys.readouterr().err
    assert await console(b_cfg, "clearing", "run", "--month", "2026-13") == 1
    assert "month '2026-13' is not YYYY-MM" in capsys.readouterr().err
    assert await console(a_cfg, "clearing", "settle", "--month", "2026-03") == 0
    assert "1 window(s) of 2026-03 SETTLED" in capsys.readouterr().out
