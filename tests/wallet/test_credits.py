"""Monthly credits: exact balances, all-or-nothing batches, idempotent batch ids."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, credit, import_persons, make_id_number, person
from tests.wallet.service_context import wallet_context
from wallet import credits
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.otp import RecordingOtpSender

Client = AsyncTestClient[Litestar]

FATHER = person(1, "张三丰")
MOTHER = person(2, "李秀英")
CHILD = person(3, "张小宝", scheme="resident", birth="20150601")


@pytest.fixture
async def ctx(
    database_url: str, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    async with wallet_context(database_url, clock, otp) as context:
        yield context


async def _post(client: Client, batch_id: str, credits_: list[dict[str, Any]]) -> Any:
    return await client.post(
        "/operator/v1/credit-batches",
        json={"batch_id": batch_id, "month": "2026-03", "credits": credits_},
        headers=OPERATOR,
    )


async def _balance(client: Client, who: dict[str, Any]) -> dict[str, int]:
    response = await client.get(f"/operator/v1/persons/{who['id_number']}", headers=OPERATOR)
    account: dict[str, int] = response.json()["personal_account"]
    return account


async def _ledger_size(db: asyncpg.Connection) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_transfer) AS t, (SELECT count(*) FROM credit_batch) AS b"
    )
    return row["t"], row["b"]


async def test_batch_credits_each_personal_account_to_the_fen(client: Client) -> None:
    await import_persons(client, FATHER, MOTHER)
    response = await _post(
        client,
        "2026-03-a",
        [
            {"id_number": FATHER["id_number"], "amount_fen": 50_000},
            {"id_number": MOTHER["id_number"], "amount_fen": 12_345},
        ],
    )
    assert response.status_code == 201, response.text
    assert response.json() == {
        "batch_id": "2026-03-a",
        "month": "2026-03",
        "row_count": 2,
        "total_fen": 62_345,
        "created": True,
    }
    assert await _balance(client, FATHER) == {
        "available_fen": 50_000,
        "pending_fen": 0,
        "posted_fen": 50_000,
    }
    assert (await _balance(client, MOTHER))["available_fen"] == 12_345


async def test_credits_are_transfers_from_the_funding_account(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, MOTHER)
    await credit(client, "b1", {FATHER["id_number"]: 700, MOTHER["id_number"]: 300})
    funding = await db.fetchrow(
        "SELECT debits_posted, credits_posted FROM account WHERE code = 'funding'"
    )
    assert (funding["debits_posted"], funding["credits_posted"]) == (1_000, 0)
    rows = await db.fetch(
        "SELECT d.code AS debit, t.amount_fen, t.purpose, t.credit_batch_id, t.phase"
        " FROM ledger_transfer t JOIN account d ON d.id = t.debit_account_id ORDER BY t.id"
    )
    assert [tuple(r) for r in rows] == [
        ("funding", 700, "monthly_credit", "b1", "single"),
        ("funding", 300, "monthly_credit", "b1", "single"),
    ]
    check = await client.get("/operator/v1/ledger/check", headers=OPERATOR)
    assert check.json()["balanced"] is True
    assert check.json()["total_debits_posted"] == 1_000


async def test_identical_replay_returns_the_stored_result_and_moves_nothing(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    first = await credit(client, "b1", {FATHER["id_number"]: 50_000})
    response = await _post(client, "b1", [{"id_number": FATHER["id_number"], "amount_fen": 50_000}])
    assert response.status_code == 200
    assert response.json() == {**first, "created": False}
    assert (await _balance(client, FATHER))["available_fen"] == 50_000
    assert await _ledger_size(db) == (1, 1)


async def test_same_batch_id_with_other_content_is_a_conflict(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    await credit(client, "b1", {FATHER["id_number"]: 50_000})
    response = await _post(client, "b1", [{"id_number": FATHER["id_number"], "amount_fen": 50_001}])
    assert (response.status_code, response.json()["code"]) == (409, "idempotency_conflict")
    assert (await _balance(client, FATHER))["available_fen"] == 50_000
    assert await _ledger_size(db) == (1, 1)


async def test_unknown_person_rejects_the_whole_batch_with_its_line(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, MOTHER)
    response = await _post(
        client,
        "b1",
        [
            {"id_number": FATHER["id_number"], "amount_fen": 100},
            {"id_number": MOTHER["id_number"], "amount_fen": 100},
            {"id_number": make_id_number(77), "amount_fen": 100},
        ],
    )
    assert response.status_code == 404
    assert (response.json()["code"], response.json()["line"]) == ("not_found", 3)
    assert await _ledger_size(db) == (0, 0)
    assert (await _balance(client, FATHER))["available_fen"] == 0


async def test_resident_scheme_person_is_refused_with_its_line(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, CHILD)
    response = await _post(
        client,
        "b1",
        [
            {"id_number": CHILD["id_number"], "amount_fen": 100},
            {"id_number": FATHER["id_number"], "amount_fen": 100},
        ],
    )
    assert response.status_code == 422
    assert (response.json()["code"], response.json()["line"]) == ("person_not_eligible", 1)
    assert await _ledger_size(db) == (0, 0)


async def test_bad_check_character_rejects_the_batch_with_its_line(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    response = await _post(
        client,
        "b1",
        [
            {"id_number": FATHER["id_number"], "amount_fen": 100},
            {"id_number": "110105194912310021", "amount_fen": 100},
        ],
    )
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["line"]) == ("roster_file_invalid", 2)
    assert await _ledger_size(db) == (0, 0)


async def test_the_same_person_twice_in_a_batch_is_refused(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    row = {"id_number": FATHER["id_number"], "amount_fen": 100}
    response = await _post(client, "b1", [row, row])
    assert (response.status_code, response.json()["line"]) == (400, 2)
    assert "already has a credit on line 1" in response.json()["detail"]
    assert await _ledger_size(db) == (0, 0)


async def test_posting_a_batch_is_audited(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    await credit(client, "b1", {FATHER["id_number"]: 100})
    event = await db.fetchrow(
        "SELECT subject, detail FROM audit_event WHERE action = 'credit_batch.post'"
    )
    assert event["subject"] == "credit_batch:b1"
    assert json.loads(event["detail"]) == {"month": "2026-03", "row_count": 1, "total_fen": 100}


# --- credit files ------------------------------------------------------------------------------


def test_credit_csv_rows_are_read_with_canonical_id_numbers(tmp_path: Path) -> None:
    path = tmp_path / "credits.csv"
    path.write_text("id_number,amount_fen\n11010519491231002x,1500\n", encoding="utf-8")
    assert credits.parse_credit_file(path) == [
        credits.CreditRow(id_number="11010519491231002X", amount_fen=1_500)
    ]


@pytest.mark.parametrize("amount", ["0", "-5", "1.5", "abc", str(2**63)])
def test_credit_csv_bad_amount_names_its_line(tmp_path: Path, amount: str) -> None:
    path = tmp_path / "credits.csv"
    path.write_text(
        f"id_number,amount_fen\n{FATHER['id_number']},100\n{MOTHER['id_number']},{amount}\n",
        encoding="utf-8",
    )
    with pytest.raises(WalletError) as caught:
        credits.parse_credit_file(path)
    assert (caught.value.code, caught.value.extensions) == (
        ErrorCode.ROSTER_FILE_INVALID,
        {"line": 3},
    )


def test_credit_json_file_holds_a_credits_list(tmp_path: Path) -> None:
    path = tmp_path / "credits.json"
    rows = [
        {"id_number": FATHER["id_number"], "amount_fen": 1},
        {"id_number": "x", "amount_fen": 1},
    ]
    path.write_text(json.dumps({"credits": rows}), encoding="utf-8")
    with pytest.raises(WalletError) as caught:
        credits.parse_credit_file(path)
    assert caught.value.extensions == {"line": 2}


async def test_unknown_person_in_a_file_is_refused_with_its_file_line(
    client: Client, ctx: WalletContext, tmp_path: Path, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    path = tmp_path / "credits.csv"
    path.write_text(
        f"id_number,amount_fen\n{FATHER['id_number']},100\n\n{MOTHER['id_number']},100\n",
        encoding="utf-8",
    )
    found = credits.read_credit_file(path)
    with pytest.raises(WalletError) as caught:
        await credits.post_batch(ctx, "b1", "2026-03", found.rows, lines=found.lines)
    assert (caught.value.code, caught.value.extensions) == (ErrorCode.NOT_FOUND, {"line": 4})
    assert await _ledger_size(db) == (0, 0)


async def test_large_batch_spreads_the_fund_debits_over_sub_accounts(
    ctx: WalletContext, db: asyncpg.Connection
) -> None:
    from wallet import roster

    people = [
        roster.RosterRow(**person(i, f"人{i}", birth=f"19{60 + i // 1000}0101"))
        for i in range(2_000)
    ]
    await roster.import_rows(ctx, people)
    rows = [credits.CreditRow(p.id_number, 100 + i) for i, p in enumerate(people)]
    result = await credits.post_batch(ctx, "big", "2026-03", rows)
    assert (result.row_count, result.total_fen) == (2_000, sum(100 + i for i in range(2_000)))
    personal = await db.fetchval("SELECT sum(credits_posted) FROM account WHERE kind = 'personal'")
    assert personal == result.total_fen
    funding = await db.fetch(
        "SELECT code, debits_posted FROM account WHERE kind = 'funding' ORDER BY id"
    )
    assert [r["code"] for r in funding] == ["funding"] + [f"funding:{i}" for i in range(1, 10)]
    assert funding[1]["debits_posted"] == sum(100 + i for i in range(200, 400))
    assert sum(r["debits_posted"] for r in funding) == result.total_fen
