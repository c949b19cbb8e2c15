"""The operator console (`plt-node`) through its real commands against a real database:
files with bad rows are refused naming the line and change nothing; every operator action
lands in the audit trail (who, what, request id), which refuses to be changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from nodes import cli, console_ops
from tests.support import OPERATOR, make_id_number

pytestmark = pytest.mark.anyio

HEADER = "id_number,name,scheme,status,pooling_region,phone\n"


def row(seq: int, name: str, region: str = "130100") -> str:
    return f"{make_id_number(seq)},{name},employee,normal,{region},138{seq:08d}\n"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(console_ops.console, "width", 250)
    monkeypatch.setattr(cli.console, "width", 250)
    yield
    structlog.reset_defaults()  # cli.main configured logging onto captured output


@pytest.fixture
def env(database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """`plt-node` pointed at the test's database (a node of Hebei, 130000)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("PLT_PROVINCE_CODE", "130000")
    monkeypatch.setenv("PLT_NODE_ID", "prov-13")
    monkeypatch.setenv("PLT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PLT_LOG_LEVEL", "WARNING")
    monkeypatch.delenv("PLT_CONFIG", raising=False)
    return tmp_path


async def plt_node(*argv: str) -> int:
    code: int = await asyncio.to_thread(cli.main, list(argv))
    return code


async def counts(db: asyncpg.Connection) -> tuple[int, int, int]:
    return (
        await db.fetchval("SELECT count(*) FROM insured_person"),
        await db.fetchval("SELECT count(*) FROM ledger_transfer"),
        await db.fetchval("SELECT count(*) FROM audit_event"),
    )


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        (row(3, "王五").replace(make_id_number(3), "110105194912310021"), "check"),
        (row(3, "王五", region="310100"), "pooling region 310100 is not in province 130000"),
        (row(1, "张三"), "already appears on line 2"),
        ("not,enough,columns\n", "line 4"),
    ],
    ids=["bad-check-digit", "other-province", "duplicate", "short-row"],
)
async def test_roster_import_with_a_bad_row_names_its_line_and_changes_nothing(
    env: Path,
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
    bad_row: str,
    problem: str,
) -> None:
    roster = env / "roster.csv"
    roster.write_text(HEADER + row(1, "张三") + row(2, "李四") + bad_row, encoding="utf-8")
    before = await counts(db)
    assert await plt_node("roster", "import", str(roster)) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "roster_file_invalid (line 4)" in err, err
    assert problem in err, err
    assert await counts(db) == before


async def test_console_actions_are_audited_and_the_trail_is_append_only(
    env: Path, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    roster = env / "roster.csv"
    roster.write_text(HEADER + row(1, "张三") + row(2, "李四"), encoding="utf-8")
    assert await plt_node("roster", "import", str(roster), "--actor", "ops-zhou") == 0
    credits = env / "credits.csv"
    credits.write_text(
        f"id_number,amount_fen\n{make_id_number(1)},12345\n{make_id_number(2)},100\n",
        encoding="utf-8",
    )
    post = ["credits", "post", str(credits), "--batch-id", "b-2026-03", "--month", "2026-03"]
    assert await plt_node(*post, "--actor", "ops-zhou") == 0
    assert (
        await plt_node("person", "status", make_id_number(2), "deceased", "--actor", "ops-qian")
        == 0
    )
    trail = await db.fetch(
        "SELECT actor, action, request_id, detail->>'total_fen' AS total FROM audit_event ORDER BY id"
    )
    assert [(r["actor"], r["action"]) for r in trail] == [
        ("ops-zhou", "roster.import"),
        ("ops-zhou", "credit_batch.post"),
        ("ops-qian", "person.set_status"),
    ]
    assert all(r["request_id"].startswith("cli-") for r in trail)
    assert len({r["request_id"] for r in trail}) == 3  # one per command
    capsys.readouterr()
    assert await plt_node("audit", "list", "--since", "3650d", "--action", "credit") == 0
    out = capsys.readouterr().out
    assert "credit_batch.post" in out and "ops-zhou" in out and "1 event(s)" in out

    for statement in ("UPDATE audit_event SET actor = 'nobody'", "DELETE FROM audit_event"):
        with pytest.raises(asyncpg.RestrictViolationError):
            await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM audit_event WHERE actor = 'nobody'") == 0
    assert await db.fetchval("SELECT count(*) FROM audit_event") == 3


async def test_operator_api_actions_carry_the_request_id_and_the_operator(
    client: Any, db: asyncpg.Connection
) -> None:
    response = await client.post(
        "/operator/v1/institutions",
        json={
            "code": "h-13-001",
            "name": "河北某医院",
            "kind": "hospital",
            "categories": ["outpatient"],
        },
        headers={**OPERATOR, "X-Request-ID": "req-audit-1", "X-Operator-Name": "ops-sun"},
    )
    assert response.status_code == 201, response.text
    suspended = await client.post(
        "/operator/v1/institutions/h-13-001/suspend",
        headers={**OPERATOR, "X-Request-ID": "req-audit-2", "X-Operator-Name": "ops-sun"},
    )
    assert suspended.status_code == 200, suspended.text
    trail = await db.fetch("SELECT actor, action, request_id FROM audit_event ORDER BY id")
    assert [tuple(r) for r in trail] == [
        ("ops-sun", "institution.register", "req-audit-1"),
        ("ops-sun", "institution.suspended", "req-audit-2"),
    ]


async def test_keys_init_makes_the_password_pepper_once_and_never_replaces_it(env: Path) -> None:
    pepper = env / "data" / "prov-13" / "keys" / "password_pepper.key"
    assert await plt_node("keys", "init") == 0
    first = pepper.read_bytes()
    assert len(first.strip()) == 43 and pepper.stat().st_mode & 0o777 == 0o600
    assert await plt_node("keys", "init", "--force") == 0  # new node keys, the same pepper
    assert pepper.read_bytes() == first


async def test_bulk_loads_leave_planner_statistics_behind(
    env: Path, db: asyncpg.Connection
) -> None:
    """A fresh database is planned as if empty until analysed (issue 14): the console's
    roster import and credit batch analyse what they loaded."""
    analysed = (
        "SELECT relname, last_analyze IS NOT NULL AS done FROM pg_stat_user_tables "
        "WHERE relname IN ('insured_person', 'account', 'wallet', 'ledger_transfer')"
    )
    roster = env / "roster.csv"
    roster.write_text(HEADER + row(1, "张三") + row(2, "李四"), encoding="utf-8")
    assert await plt_node("roster", "import", str(roster)) == 0
    credits = env / "credits.csv"
    credits.write_text(f"id_number,amount_fen\n{make_id_number(1)},100\n", encoding="utf-8")
    assert (
        await plt_node("credits", "post", str(credits), "--batch-id", "b1", "--month", "2026-03")
        == 0
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the statistics collector reports asynchronously
        done = {r["relname"]: r["done"] for r in await db.fetch(analysed)}
        if all(done.values()) or asyncio.get_running_loop().time() > deadline:
            break
        await db.execute("SELECT pg_stat_clear_snapshot()")
        await asyncio.sleep(0.2)
    assert done == dict.fromkeys(("insured_person", "account", "wallet", "ledger_transfer"), True)
