"""What a wallet shows (RULES 10): balances and every record, with counterpart and purpose."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import bearer, credit, import_persons, open_wallet, person
from wallet import ledger
from wallet.otp import RecordingOtpSender

Client = AsyncTestClient[Litestar]

FATHER = person(1, "张三丰")
CHILD = person(2, "张小宝", scheme="resident", birth="20150601")
PHARMACY = "康泰大药房"


class Scene:
    """Father (employee) credited 500.00; he pays 30.00 for himself and 20.00 for his child
    (a filed relationship); the pharmacy refunds 5.00 of the child's purchase to him."""

    def __init__(self, father_token: str, child_token: str) -> None:
        self.father = bearer(father_token)
        self.child = bearer(child_token)


async def _id(db: asyncpg.Connection, who: dict[str, Any]) -> tuple[int, int | None]:
    row = await db.fetchrow(
        "SELECT id, personal_account_id FROM insured_person WHERE id_number = $1", who["id_number"]
    )
    return row["id"], row["personal_account_id"]


async def _settle(
    db: asyncpg.Connection,
    institution: tuple[int, int],
    patient_id: int,
    reference: str,
    source: tuple[str, int, int | None],
    amount_fen: int,
) -> int:
    """A settlement as wallet.settlement records one: the row, its source, its transfer."""
    kind, account_id, relationship_id = source
    settlement_id: int = await db.fetchval(
        "INSERT INTO settlement (institution_id, reference, request_hash, patient_person_id,"
        " category, requested_fen, amount_fen, created_at)"
        " VALUES ($1, $2, '\\x00', $3, 'pharmacy_drug', $4, $4, now()) RETURNING id",
        institution[0],
        reference,
        patient_id,
        amount_fen,
    )
    await db.execute(
        "INSERT INTO settlement_source (settlement_id, seq, source, account_id, relationship_id,"
        " amount_fen) VALUES ($1, 0, $2, $3, $4, $5)",
        settlement_id,
        kind,
        account_id,
        relationship_id,
        amount_fen,
    )
    await ledger.transfer(
        db,
        debit_account_id=account_id,
        credit_account_id=institution[1],
        amount_fen=amount_fen,
        purpose="pharmacy_drug",
        settlement_id=settlement_id,
    )
    return settlement_id


async def _refund(
    db: asyncpg.Connection,
    institution: tuple[int, int],
    settlement_id: int,
    account_id: int,
    fen: int,
) -> None:
    refund_id = await db.fetchval(
        "INSERT INTO refund (settlement_id, institution_id, reference, request_hash, amount_fen,"
        " created_at) VALUES ($1, $2, 'RF-1', '\\x00', $3, now()) RETURNING id",
        settlement_id,
        institution[0],
        fen,
    )
    await ledger.transfer(
        db,
        debit_account_id=institution[1],
        credit_account_id=account_id,
        amount_fen=fen,
        purpose="refund",
        settlement_id=settlement_id,
        refund_id=refund_id,
    )


@pytest.fixture
async def scene(client: Client, otp: RecordingOtpSender, db: asyncpg.Connection) -> Scene:
    await import_persons(client, FATHER, CHILD)
    await credit(client, "2026-03", {FATHER["id_number"]: 50_000})
    father_id, father_account = await _id(db, FATHER)
    child_id, _ = await _id(db, CHILD)
    assert father_account is not None
    account_id = await ledger.open_account(db, "institution", "institution:kt")
    institution_id = await db.fetchval(
        "INSERT INTO institution (code, name, kind, categories, api_key_hash, account_id)"
        " VALUES ('kt', $1, 'pharmacy', '{pharmacy_drug}', '\\x01', $2) RETURNING id",
        PHARMACY,
        account_id,
    )
    institution = (institution_id, account_id)
    relationship_id = await db.fetchval(
        "INSERT INTO relationship (giver_person_id, receiver_person_id, relation_type,"
        " evidence_ref, state, filed_at) VALUES ($1, $2, 'child', 'HK-1', 'active', now())"
        " RETURNING id",
        father_id,
        child_id,
    )
    await _settle(db, institution, father_id, "RX-1", ("own", father_account, None), 3_000)
    shared = await _settle(
        db, institution, child_id, "RX-2", ("giver", father_account, relationship_id), 2_000
    )
    await _refund(db, institution, shared, father_account, 500)
    return Scene(await open_wallet(client, otp, FATHER), await open_wallet(client, otp, CHILD))


def _brief(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (r["direction"], r["source"], r["amount_fen"], r["purpose"], r["counterpart"])
        for r in records
    ]


async def _records(client: Client, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = await client.get("/app/v1/wallet/records", headers=headers, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_giver_sees_credit_own_purchase_shared_purchase_and_refund(
    client: Client, scene: Scene
) -> None:
    body = await _records(client, scene.father)
    assert _brief(body["records"]) == [
        ("in", "own", 500, "refund", PHARMACY),
        ("out", "own", 2_000, "pharmacy_drug", PHARMACY),
        ("out", "own", 3_000, "pharmacy_drug", PHARMACY),
        ("in", "own", 50_000, "monthly_credit", "province fund"),
    ]
    assert body["next_before_id"] is None
    refund, shared, own, monthly = body["records"]
    assert (shared["patient_name_masked"], shared["relation_type"]) == ("张**", "child")
    assert (refund["patient_name_masked"], refund["relation_type"]) == ("张**", "child")
    assert (own["patient_name_masked"], own["relation_type"]) == (None, None)
    assert monthly["counterpart_kind"] == "province_fund"
    assert shared["settlement_id"] == refund["settlement_id"] != own["settlement_id"]


async def test_giver_balance_is_exact_after_purchases_and_refund(
    client: Client, scene: Scene
) -> None:
    response = await client.get("/app/v1/wallet", headers=scene.father)
    assert response.json()["personal_account"] == {
        "available_fen": 50_000 - 3_000 - 2_000 + 500,
        "pending_fen": 0,
        "posted_fen": 45_500,
    }


async def test_receiver_sees_who_shared_with_them(client: Client, scene: Scene) -> None:
    body = await _records(client, scene.child)
    assert _brief(body["records"]) == [
        ("in", "giver", 500, "refund", PHARMACY),
        ("out", "giver", 2_000, "pharmacy_drug", PHARMACY),
    ]
    assert {r["giver_name_masked"] for r in body["records"]} == {"张**"}
    assert {r["relation_type"] for r in body["records"]} == {"child"}
    assert {r["patient_name_masked"] for r in body["records"]} == {None}


async def test_pages_follow_the_cursor_to_the_end(client: Client, scene: Scene) -> None:
    everything = (await _records(client, scene.father))["records"]
    first = await _records(client, scene.father, limit=3)
    assert first["records"] == everything[:3]
    assert first["next_before_id"] == everything[2]["id"]
    second = await _records(client, scene.father, limit=3, before_id=first["next_before_id"])
    assert second == {"records": everything[3:], "next_before_id": None}


async def test_direction_filter_keeps_only_incoming(client: Client, scene: Scene) -> None:
    body = await _records(client, scene.father, direction="in")
    assert [r["purpose"] for r in body["records"]] == ["refund", "monthly_credit"]


async def test_purpose_filter_applies_to_shared_records_too(client: Client, scene: Scene) -> None:
    father = await _records(client, scene.father, purpose="monthly_credit")
    child = await _records(client, scene.child, purpose="pharmacy_drug")
    assert _brief(father["records"]) == [("in", "own", 50_000, "monthly_credit", "province fund")]
    assert _brief(child["records"]) == [("out", "giver", 2_000, "pharmacy_drug", PHARMACY)]


async def test_time_window_is_since_inclusive_until_exclusive(
    client: Client, scene: Scene, db: asyncpg.Connection
) -> None:
    times = [
        r["created_at"]
        for r in await db.fetch("SELECT created_at FROM ledger_transfer ORDER BY id")
    ]
    assert times == sorted(times) and len(set(times)) == 4
    since, until = times[1], times[3]
    body = await _records(client, scene.father, since=since.isoformat(), until=until.isoformat())
    assert [dt.datetime.fromisoformat(r["created_at"]) for r in body["records"]] == [
        times[2],
        times[1],
    ]
