"""A busy institution is paid into several accounts (`institution:<code>` and its
sub-accounts), so its concurrent payments do not all queue on one account row; what it is
owed is their sum, refunds come out of the account the settlement paid into, and nothing
of the ledger's invariants changes."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg

from tests.support import OPERATOR
from tests.wallet.test_settlement import (
    Client,
    assert_books_balanced,
    institution,
    institution_balance,
    member,
    pay,
    payment_code,
    settle,
)
from wallet.institutions import INSTITUTION_SLOTS
from wallet.otp import RecordingOtpSender

_ACCOUNTS = """
SELECT a.code, a.kind, a.debits_must_not_exceed_credits,
       a.credits_posted - a.debits_posted - a.debits_pending AS balance_fen
FROM account a WHERE a.kind = 'institution' AND split_part(a.code, ':', 2) = $1
ORDER BY a.id
"""


def _slot(code: str) -> int:
    return hashlib.sha256(code.encode()).digest()[0] % INSTITUTION_SLOTS


async def test_registration_opens_the_sub_accounts(client: Client, db: asyncpg.Connection) -> None:
    await institution(client)
    rows = await db.fetch(_ACCOUNTS, "H1")
    assert [(r["code"], r["kind"], r["debits_must_not_exceed_credits"]) for r in rows] == [
        ("institution:H1", "institution", True),
        *((f"institution:H1:{slot}", "institution", True) for slot in range(1, INSTITUTION_SLOTS)),
    ]


async def test_payments_spread_over_the_sub_accounts_and_are_summed(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王五", fen=100_000)
    key = await institution(client)
    codes = [await payment_code(client, patient) for _ in range(24)]
    responses = await asyncio.gather(
        *(settle(client, key, code, 100 + i, reference=f"r{i}") for i, code in enumerate(codes))
    )
    assert [r.status_code for r in responses] == [201] * 24

    expected = dict.fromkeys(range(INSTITUTION_SLOTS), 0)
    for i, code in enumerate(codes):
        expected[_slot(code)] += 100 + i
    rows = await db.fetch(_ACCOUNTS, "H1")
    assert [r["balance_fen"] for r in rows] == [expected[s] for s in range(INSTITUTION_SLOTS)]
    assert len([s for s in expected.values() if s]) > 1  # really spread
    assert await institution_balance(client) == sum(100 + i for i in range(24))
    await assert_books_balanced(db)


async def test_refund_comes_out_of_the_account_the_settlement_paid_into(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王五", fen=10_000)
    key = await institution(client)
    code = await payment_code(client, patient)
    made = await settle(client, key, code, 600, reference="visit-1")
    assert made.status_code == 201
    response = await client.post(
        "/institution/v1/settlements/visit-1/refunds",
        json={"reference": "refund-1", "amount_fen": 250},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 201, response.text

    paid_into = "institution:H1" + (f":{_slot(code)}" if _slot(code) else "")
    balances = {r["code"]: r["balance_fen"] for r in await db.fetch(_ACCOUNTS, "H1")}
    assert balances[paid_into] == 350
    assert sum(balances.values()) == 350
    assert await institution_balance(client) == 350
    await assert_books_balanced(db)


async def test_an_institution_without_sub_accounts_gets_them_as_it_is_paid(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    """Registered before sub-accounts existed (here: written straight into the tables, as
    an older node did): paid into its main account until a slot's sub-account is opened."""
    patient = await member(client, otp, 1, "王五", fen=100_000)
    account = await db.fetchval(
        "INSERT INTO account (kind, code, debits_must_not_exceed_credits) "
        "VALUES ('institution', 'institution:OLD', true) RETURNING id"
    )
    await db.execute(
        "INSERT INTO institution (code, name, kind, categories, api_key_hash, account_id) "
        "VALUES ('OLD', '老医院', 'hospital', ARRAY['outpatient'], $1, $2)",
        hashlib.sha256(b"inst_old-key").digest(),
        account,
    )
    codes = []
    while len({_slot(c) for c in codes if _slot(c)}) < 2 or len(codes) < 4:
        codes.append(await payment_code(client, patient))
    for i, code in enumerate(codes):
        response = await settle(client, "inst_old-key", code, 100, reference=f"r{i}")
        assert response.status_code == 201, response.text

    rows = {r["code"]: r["balance_fen"] for r in await db.fetch(_ACCOUNTS, "OLD")}
    seen: set[int] = set()
    expected: dict[str, int] = {"institution:OLD": 0}
    for code in codes:
        slot = _slot(code)
        target = f"institution:OLD:{slot}" if slot and slot in seen else "institution:OLD"
        expected[target] = expected.get(target, 0) + 100
        if slot:
            seen.add(slot)
            expected.setdefault(f"institution:OLD:{slot}", 0)
    assert rows == expected
    listed = await client.get("/operator/v1/institutions", headers=OPERATOR)
    (old,) = [i for i in listed.json() if i["code"] == "OLD"]
    assert old["balance_fen"] == 100 * len(codes)
    await assert_books_balanced(db)


async def test_the_patients_records_name_the_institution_whatever_the_account(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王五", fen=10_000)
    key = await institution(client)
    for i in range(6):
        assert (await pay(client, key, patient, 100, f"r{i}")).status_code == 201
    response = await client.get("/app/v1/wallet/records", headers=patient.auth)
    assert response.status_code == 200, response.text
    spent = [r for r in response.json()["records"] if r["direction"] == "out"]
    assert len(spent) == 6
    assert {(r["counterpart_kind"], r["counterpart"]) for r in spent} == {
        ("institution", "Institution H1")
    }
