"""Settlement at designated institutions (RULES 17-19), through the HTTP API.

The helpers at the top are shared by the other settlement-family test modules (refunds,
concurrency, bad input, the money property).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
import httpx
import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import (
    OPERATOR,
    PASSWORD,
    available_fen,
    bearer,
    credit,
    import_persons,
    open_wallet,
    person,
)
from wallet.clock import ManualClock
from wallet.ledger import check_books
from wallet.otp import RecordingOtpSender

Client: TypeAlias = AsyncTestClient[Litestar]
HOSPITAL_CATEGORIES = ("outpatient", "inpatient", "pharmacy_drug", "medical_consumable")

# --- helpers (shared) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An insured person with an open wallet and a session."""

    who: dict[str, Any]
    token: str

    @property
    def id_number(self) -> str:
        value: str = self.who["id_number"]
        return value

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)


async def member(
    client: Client,
    otp: RecordingOtpSender,
    seq: int,
    name: str,
    *,
    fen: int = 0,
    scheme: str = "employee",
    birth: str = "19800101",
) -> Member:
    """Put a person on the roster, open their wallet and credit `fen` to their account."""
    who = person(seq, name, scheme=scheme, birth=birth)
    await import_persons(client, who)
    token = await open_wallet(client, otp, who)
    if fen:
        await credit(client, f"seed-{seq}", {who["id_number"]: fen})
    return Member(who, token)


async def file_relationship(
    client: Client, giver: Member, receiver: Member, relation_type: str = "child"
) -> httpx.Response:
    return await client.post(
        "/app/v1/relationships",
        json={
            "receiver_id_number": receiver.id_number,
            "receiver_name": receiver.who["name"],
            "relation_type": relation_type,
            "evidence_ref": "hukou-0001",
            "payment_password": PASSWORD,
        },
        headers=giver.auth,
    )


async def share(client: Client, giver: Member, receiver: Member) -> int:
    """File and confirm a relationship giver -> receiver; return its id."""
    response = await file_relationship(client, giver, receiver)
    assert response.status_code == 201, response.text
    relationship_id: int = response.json()["id"]
    response = await client.post(
        f"/app/v1/relationships/{relationship_id}/confirm",
        json={"payment_password": PASSWORD},
        headers=receiver.auth,
    )
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "active"
    return relationship_id


async def end_relationship(client: Client, by: Member, relationship_id: int) -> httpx.Response:
    return await client.post(
        f"/app/v1/relationships/{relationship_id}/end",
        json={"payment_password": PASSWORD},
        headers=by.auth,
    )


async def institution(
    client: Client,
    code: str = "H1",
    *,
    kind: str = "hospital",
    categories: tuple[str, ...] = HOSPITAL_CATEGORIES,
) -> str:
    """Register an institution; return its API key."""
    response = await client.post(
        "/operator/v1/institutions",
        json={"code": code, "name": f"Institution {code}", "kind": kind, "categories": categories},
        headers=OPERATOR,
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["api_key"]
    return key


async def payment_code(client: Client, patient: Member) -> str:
    response = await client.post("/app/v1/payment-codes", headers=patient.auth)
    assert response.status_code == 201, response.text
    code: str = response.json()["code"]
    return code


async def settle(
    client: Client,
    api_key: str,
    code: str,
    amount_fen: int,
    *,
    reference: str,
    category: str = "outpatient",
    allow_partial: bool = False,
) -> httpx.Response:
    return await client.post(
        "/institution/v1/settlements",
        json={
            "payment_code": code,
            "amount_fen": amount_fen,
            "category": category,
            "reference": reference,
            "allow_partial": allow_partial,
        },
        headers=bearer(api_key),
    )


async def pay(
    client: Client, api_key: str, patient: Member, amount_fen: int, reference: str, **kw: Any
) -> httpx.Response:
    """A fresh payment code from the patient, settled at once."""
    return await settle(
        client, api_key, await payment_code(client, patient), amount_fen, reference=reference, **kw
    )


def set_rules(client: Client, **changes: Any) -> None:
    """Change the running node's province rules (a settings change, for one test)."""
    ctx = client.app.state.ctx
    ctx.rules = msgspec.structs.replace(ctx.rules, **changes)


def breakdown(body: dict[str, Any]) -> list[tuple[str, int, int | None]]:
    """(source, amount_fen, relationship_id) per source, in deduction order."""
    return [(s["source"], s["amount_fen"], s["relationship_id"]) for s in body["sources"]]


async def institution_balance(client: Client, code: str = "H1") -> int:
    response = await client.get("/operator/v1/institutions", headers=OPERATOR)
    assert response.status_code == 200, response.text
    (found,) = [i for i in response.json() if i["code"] == code]
    value: int = found["balance_fen"]
    return value


async def assert_books_balanced(db: asyncpg.Connection) -> None:
    books = await check_books(db)
    assert books.balanced, books


# --- who pays, in which order (RULES 19) -----------------------------------------------------


async def test_own_personal_account_pays_first(client: Client, otp: RecordingOtpSender) -> None:
    patient = await member(client, otp, 1, "王小明", fen=500)
    giver = await member(client, otp, 2, "王大山", fen=1000)
    await share(client, giver, patient)
    key = await institution(client)

    response = await pay(client, key, patient, 300, "visit-1")

    assert response.status_code == 201, response.text
    body = response.json()
    assert breakdown(body) == [("own", 300, None)]
    assert (body["requested_fen"], body["amount_fen"], body["remainder_fen"]) == (300, 300, 0)
    assert await available_fen(client, patient.token) == 200
    assert await available_fen(client, giver.token) == 1000
    assert await institution_balance(client) == 300


async def test_givers_pay_after_own_account_in_filing_order(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=100)
    first = await member(client, otp, 2, "王大山", fen=200)
    second = await member(client, otp, 3, "李秀英", fen=500)
    r1 = await share(client, first, patient)
    r2 = await share(client, second, patient)
    key = await institution(client)

    response = await pay(client, key, patient, 600, "visit-1")

    assert response.status_code == 201, response.text
    assert breakdown(response.json()) == [
        ("own", 100, None),
        ("giver", 200, r1),
        ("giver", 300, r2),
    ]
    assert [s["seq"] for s in response.json()["sources"]] == [0, 1, 2]
    assert response.json()["sources"][1]["giver_name_masked"] == "王**"
    assert await available_fen(client, patient.token) == 0
    assert await available_fen(client, first.token) == 0
    assert await available_fen(client, second.token) == 200


async def test_giver_balance_desc_draws_the_richest_giver_first(
    client: Client, otp: RecordingOtpSender
) -> None:
    set_rules(client, deduction_strategy="giver_balance_desc")
    patient = await member(client, otp, 1, "王小明", fen=100)
    poorer = await member(client, otp, 2, "王大山", fen=200)
    richer = await member(client, otp, 3, "李秀英", fen=500)
    r_poorer = await share(client, poorer, patient)
    r_richer = await share(client, richer, patient)
    key = await institution(client)

    response = await pay(client, key, patient, 700, "visit-1")

    assert response.status_code == 201, response.text
    assert breakdown(response.json()) == [
        ("own", 100, None),
        ("giver", 500, r_richer),
        ("giver", 100, r_poorer),
    ]
    assert await available_fen(client, richer.token) == 0
    assert await available_fen(client, poorer.token) == 100


async def test_giver_balance_desc_breaks_ties_by_filing_order(
    client: Client, otp: RecordingOtpSender
) -> None:
    set_rules(client, deduction_strategy="giver_balance_desc")
    patient = await member(client, otp, 1, "王小明")
    first = await member(client, otp, 2, "王大山", fen=300)
    second = await member(client, otp, 3, "李秀英", fen=300)
    r1 = await share(client, first, patient)
    r2 = await share(client, second, patient)
    key = await institution(client)

    response = await pay(client, key, patient, 400, "visit-1")

    assert breakdown(response.json()) == [("giver", 300, r1), ("giver", 100, r2)]


async def test_receiver_order_follows_the_receivers_list_then_filing_order(
    client: Client, otp: RecordingOtpSender
) -> None:
    set_rules(client, deduction_strategy="receiver_order")
    patient = await member(client, otp, 1, "王小明")
    g1 = await member(client, otp, 2, "王大山", fen=100)
    g2 = await member(client, otp, 3, "李秀英", fen=100)
    g3 = await member(client, otp, 4, "赵四", fen=100)
    r1 = await share(client, g1, patient)
    r2 = await share(client, g2, patient)
    r3 = await share(client, g3, patient)
    ordered = await client.put(
        "/app/v1/relationships/order", json={"relationship_ids": [r3, r1]}, headers=patient.auth
    )
    assert ordered.status_code == 200, ordered.text
    key = await institution(client)

    response = await pay(client, key, patient, 250, "visit-1")

    assert breakdown(response.json()) == [("giver", 100, r3), ("giver", 100, r1), ("giver", 50, r2)]


async def test_resident_patient_without_personal_account_is_paid_by_givers(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", scheme="resident")
    giver = await member(client, otp, 2, "王大山", fen=1000)
    rid = await share(client, giver, patient)
    key = await institution(client)

    response = await pay(client, key, patient, 400, "visit-1")

    assert response.status_code == 201, response.text
    assert breakdown(response.json()) == [("giver", 400, rid)]
    assert await available_fen(client, giver.token) == 600


async def test_sharing_is_directed_the_receiver_never_pays_for_the_giver(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明", fen=1000)
    await share(client, giver, receiver)
    key = await institution(client)

    response = await pay(client, key, giver, 100, "visit-1")

    assert response.status_code == 409
    assert response.json()["code"] == "insufficient_funds"
    assert await available_fen(client, receiver.token) == 1000


async def test_giver_leaving_normal_status_stops_sharing(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明")
    giver = await member(client, otp, 2, "王大山", fen=1000)
    await share(client, giver, patient)
    await import_persons(client, person(2, "王大山", status="suspended"))
    key = await institution(client)

    response = await pay(client, key, patient, 100, "visit-1")

    assert response.status_code == 409
    assert response.json()["code"] == "insufficient_funds"


# --- partial payments and shortfalls ---------------------------------------------------------


async def test_shortfall_is_refused_and_changes_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=300)
    giver = await member(client, otp, 2, "王大山", fen=200)
    await share(client, giver, patient)
    key = await institution(client)
    code = await payment_code(client, patient)

    response = await settle(client, key, code, 501, reference="visit-1")

    assert response.status_code == 409
    assert response.json()["code"] == "insufficient_funds"
    assert await available_fen(client, patient.token) == 300
    assert await available_fen(client, giver.token) == 200
    assert await db.fetchval("SELECT count(*) FROM settlement") == 0
    assert await db.fetchval("SELECT used_at FROM payment_code") is None


async def test_refused_payment_leaves_the_code_usable_for_a_smaller_amount(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=300)
    key = await institution(client)
    code = await payment_code(client, patient)
    assert (await settle(client, key, code, 301, reference="visit-1")).status_code == 409

    response = await settle(client, key, code, 300, reference="visit-2")

    assert response.status_code == 201, response.text
    assert await available_fen(client, patient.token) == 0


async def test_partial_payment_settles_what_is_covered_and_reports_the_remainder(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=300)
    giver = await member(client, otp, 2, "王大山", fen=200)
    rid = await share(client, giver, patient)
    key = await institution(client)

    response = await pay(client, key, patient, 800, "visit-1", allow_partial=True)

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["requested_fen"], body["amount_fen"], body["remainder_fen"]) == (800, 500, 300)
    assert breakdown(body) == [("own", 300, None), ("giver", 200, rid)]
    assert await available_fen(client, patient.token) == 0
    assert await available_fen(client, giver.token) == 0


async def test_partial_payment_covering_nothing_is_insufficient_funds(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明")
    key = await institution(client)

    response = await pay(client, key, patient, 100, "visit-1", allow_partial=True)

    assert response.status_code == 409
    assert response.json()["code"] == "insufficient_funds"


# --- categories (RULES 17) -------------------------------------------------------------------


async def test_forbidden_category_is_refused(client: Client, otp: RecordingOtpSender) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)

    for category in (
        "cash",
        "fitness",
        "wellness_product",
        "commercial_insurance",
        "public_health",
    ):
        response = await pay(client, key, patient, 100, f"visit-{category}", category=category)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "category_forbidden"
    assert await available_fen(client, patient.token) == 1000


async def test_category_outside_the_institutions_designation_is_forbidden(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client, "P1", kind="pharmacy", categories=("pharmacy_drug",))

    response = await pay(client, key, patient, 100, "visit-1", category="inpatient")

    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert await available_fen(client, patient.token) == 1000


async def test_health_checkup_is_payable_only_where_the_province_allows_it(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client, categories=("outpatient", "health_checkup"))

    refused = await pay(client, key, patient, 100, "checkup-1", category="health_checkup")
    set_rules(client, health_checkups_allowed=True)
    allowed = await pay(client, key, patient, 100, "checkup-2", category="health_checkup")

    assert refused.status_code == 422
    assert refused.json()["code"] == "category_forbidden"
    assert allowed.status_code == 201, allowed.text
    assert await available_fen(client, patient.token) == 900


async def test_agency_collects_a_relatives_resident_and_care_premiums_from_a_giver(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王奶奶", scheme="resident")
    giver = await member(client, otp, 2, "王大山", fen=100_000)
    rid = await share(client, giver, patient)
    key = await institution(
        client, "TAX1", kind="agency", categories=("resident_premium", "long_term_care_premium")
    )

    premium = await pay(client, key, patient, 38_000, "premium-2026", category="resident_premium")
    care = await pay(client, key, patient, 5_000, "ltc-2026", category="long_term_care_premium")

    assert premium.status_code == 201, premium.text
    assert care.status_code == 201, care.text
    assert breakdown(premium.json()) == [("giver", 38_000, rid)]
    assert breakdown(care.json()) == [("giver", 5_000, rid)]
    assert await available_fen(client, giver.token) == 57_000
    assert await institution_balance(client, "TAX1") == 43_000


# --- payment codes (RULES 18) ----------------------------------------------------------------


async def test_payment_code_is_18_random_digits_stored_only_as_a_digest(
    client: Client, otp: RecordingOtpSender, clock: ManualClock, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明")

    response = await client.post("/app/v1/payment-codes", headers=patient.auth)

    assert response.status_code == 201
    body = response.json()
    assert len(body["code"]) == 18 and body["code"].isdigit()
    assert dt.datetime.fromisoformat(body["expires_at"]) == clock.now() + dt.timedelta(seconds=60)
    stored = await db.fetchval("SELECT code_hash FROM payment_code")
    assert stored == hashlib.sha256(body["code"].encode()).digest()


async def test_expired_payment_code_is_refused(
    client: Client, otp: RecordingOtpSender, clock: ManualClock
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)
    clock.advance(seconds=60)

    response = await settle(client, key, code, 100, reference="visit-1")

    assert response.status_code == 410
    assert response.json()["code"] == "payment_code_expired"
    assert await available_fen(client, patient.token) == 1000


async def test_payment_code_within_its_lifetime_is_accepted(
    client: Client, otp: RecordingOtpSender, clock: ManualClock
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)
    clock.advance(seconds=59)

    response = await settle(client, key, code, 100, reference="visit-1")

    assert response.status_code == 201


async def test_used_payment_code_is_refused(client: Client, otp: RecordingOtpSender) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)
    assert (await settle(client, key, code, 100, reference="visit-1")).status_code == 201

    response = await settle(client, key, code, 100, reference="visit-2")

    assert response.status_code == 410
    assert response.json()["code"] == "payment_code_used"
    assert await available_fen(client, patient.token) == 900


async def test_unknown_payment_code_is_not_found(client: Client, otp: RecordingOtpSender) -> None:
    await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)

    response = await settle(client, key, "123456789012345678", 100, reference="visit-1")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_patient_out_of_normal_status_cannot_pay(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)
    await import_persons(client, person(1, "王小明", status="suspended"))

    response = await settle(client, key, code, 100, reference="visit-1")

    assert response.status_code == 422
    assert response.json()["code"] == "person_not_eligible"


# --- idempotency ---------------------------------------------------------------------------


async def test_same_settlement_request_is_replayed_not_charged_twice(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)

    first = await settle(client, key, code, 250, reference="visit-1")
    again = await settle(client, key, code, 250, reference="visit-1")

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert await available_fen(client, patient.token) == 750


async def test_same_reference_with_another_request_is_an_idempotency_conflict(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    code = await payment_code(client, patient)
    assert (await settle(client, key, code, 250, reference="visit-1")).status_code == 201

    response = await settle(client, key, code, 260, reference="visit-1")

    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_conflict"
    assert await available_fen(client, patient.token) == 750


async def test_references_are_per_institution(client: Client, otp: RecordingOtpSender) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    h1 = await institution(client, "H1")
    h2 = await institution(client, "H2")

    first = await pay(client, h1, patient, 100, "visit-1")
    second = await pay(client, h2, patient, 100, "visit-1")

    assert (first.status_code, second.status_code) == (201, 201)
    assert await available_fen(client, patient.token) == 800


# --- reading and the ledger ---------------------------------------------------------------


async def test_institution_reads_its_settlement_by_reference(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    made = await pay(client, key, patient, 100, "visit-1")

    response = await client.get("/institution/v1/settlements/visit-1", headers=bearer(key))

    assert response.status_code == 200
    assert response.json() == made.json()
    assert response.json()["patient_name_masked"] == "王**"


async def test_another_institutions_settlement_is_not_found(
    client: Client, otp: RecordingOtpSender
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    h1 = await institution(client, "H1")
    h2 = await institution(client, "H2")
    await pay(client, h1, patient, 100, "visit-1")

    response = await client.get("/institution/v1/settlements/visit-1", headers=bearer(h2))

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_settlement_posts_one_transfer_per_source_with_the_category_as_purpose(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    patient = await member(client, otp, 1, "王小明", fen=100)
    giver = await member(client, otp, 2, "王大山", fen=1000)
    await share(client, giver, patient)
    key = await institution(client)

    body = (await pay(client, key, patient, 300, "visit-1", category="inpatient")).json()

    rows = await db.fetch(
        "SELECT t.amount_fen, t.purpose, t.phase, "
        "(a.kind = 'institution' AND split_part(a.code, ':', 2) = 'H1') AS to_inst "
        "FROM ledger_transfer t JOIN account a ON a.id = t.credit_account_id "
        "WHERE t.settlement_id = $1 ORDER BY t.id",
        body["settlement_id"],
    )
    assert [tuple(r) for r in rows] == [
        (100, "inpatient", "single", True),
        (200, "inpatient", "single", True),
    ]
    await assert_books_balanced(db)


async def test_suspended_institution_cannot_settle(client: Client, otp: RecordingOtpSender) -> None:
    patient = await member(client, otp, 1, "王小明", fen=1000)
    key = await institution(client)
    suspended = await client.post("/operator/v1/institutions/H1/suspend", headers=OPERATOR)
    assert suspended.status_code == 200

    response = await pay(client, key, patient, 100, "visit-1")

    assert response.status_code == 403
    assert await available_fen(client, patient.token) == 1000
