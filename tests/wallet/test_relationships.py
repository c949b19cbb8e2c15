"""Relationships in the province (RULES 1-8), through the HTTP API."""

from __future__ import annotations

import asyncio
import json
from typing import TypeAlias

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, PASSWORD, bearer, import_persons, person
from tests.wallet.test_settlement import (
    Member,
    end_relationship,
    file_relationship,
    institution,
    member,
    pay,
    set_rules,
    share,
)
from wallet.otp import RecordingOtpSender
from wallet.rules import RelationType

Client: TypeAlias = AsyncTestClient[Litestar]


async def confirm(client: Client, receiver: Member, relationship_id: int) -> dict[str, object]:
    response = await client.post(
        f"/app/v1/relationships/{relationship_id}/confirm",
        json={"payment_password": PASSWORD},
        headers=receiver.auth,
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def filed(client: Client, giver: Member, receiver: Member) -> int:
    response = await file_relationship(client, giver, receiver)
    assert response.status_code == 201, response.text
    relationship_id: int = response.json()["id"]
    return relationship_id


def masked(id_number: str) -> str:
    return id_number[:4] + "*" * 10 + id_number[-4:]


async def relationship_count(db: asyncpg.Connection) -> int:
    value: int = await db.fetchval("SELECT count(*) FROM relationship")
    return value


# --- filing ------------------------------------------------------------------------------


async def test_giver_files_and_it_waits_for_the_receiver(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")

    response = await file_relationship(client, giver, receiver, "child")

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["state"] == "pending_confirmation"
    assert body["viewer"] == "giver"
    assert body["relation_type"] == "child"
    assert (body["giver_name_masked"], body["giver_id_number_masked"]) == (None, None)
    assert body["receiver_name_masked"] == "王**"
    assert body["receiver_id_number_masked"] == masked(receiver.id_number)
    assert body["evidence_ref"] == "hukou-0001"


async def test_receiver_confirms_and_it_becomes_active(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    body = await confirm(client, receiver, rid)

    assert body["state"] == "active"
    assert body["viewer"] == "receiver"
    assert (body["receiver_name_masked"], body["receiver_id_number_masked"]) == (None, None)
    assert body["giver_name_masked"] == "王**"
    assert body["giver_id_number_masked"] == masked(giver.id_number)
    # The giver's filing evidence is not shown back to the receiver.
    assert body["evidence_ref"] is None
    assert body["confirmed_at"] is not None


async def test_every_close_relative_type_can_be_filed(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    for seq, relation_type in enumerate(RelationType, start=10):
        receiver = await member(client, otp, seq, f"亲属{seq}")
        response = await file_relationship(client, giver, receiver, relation_type.value)
        assert response.status_code == 201, response.text


async def test_in_law_is_not_a_close_relative(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "李秀英")

    for relation_type in ("parent_in_law", "child_in_law", "sibling_in_law"):
        response = await file_relationship(client, giver, receiver, relation_type)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_request"
    assert await relationship_count(db) == 0


async def test_relation_type_the_province_does_not_accept_is_refused(
    client: Client, otp: RecordingOtpSender
) -> None:
    set_rules(
        client,
        allowed_relation_types=(RelationType.SPOUSE, RelationType.PARENT, RelationType.CHILD),
    )
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")

    response = await file_relationship(client, giver, receiver, "sibling")

    assert response.status_code == 422
    assert response.json()["code"] == "relationship_not_allowed"
    assert response.json()["reason"] == "relation_type_not_accepted"


async def test_resident_scheme_member_cannot_be_a_giver(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山", scheme="resident")
    receiver = await member(client, otp, 2, "王小明")

    response = await file_relationship(client, giver, receiver)

    assert response.status_code == 422
    assert response.json()["code"] == "person_not_eligible"
    assert await relationship_count(db) == 0


async def test_resident_scheme_member_can_be_a_receiver(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明", scheme="resident")

    assert await share(client, giver, receiver) > 0


async def test_giver_out_of_normal_status_cannot_file(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    await import_persons(client, person(1, "王大山", status="suspended"))

    response = await file_relationship(client, giver, receiver)

    assert response.status_code == 422
    assert response.json()["code"] == "person_not_eligible"


async def test_receiver_out_of_normal_status_is_refused(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    await import_persons(client, person(2, "王小明", status="deceased"))
    receiver = Member(person(2, "王小明"), token="")

    response = await file_relationship(client, giver, receiver)

    assert response.status_code == 422
    assert response.json()["code"] == "person_not_eligible"


async def test_receiver_without_a_wallet_yet_can_be_filed(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    await import_persons(client, person(2, "王小明"))

    response = await file_relationship(client, giver, Member(person(2, "王小明"), token=""))

    assert response.status_code == 201
    assert response.json()["state"] == "pending_confirmation"


async def test_a_person_cannot_share_with_themselves(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")

    response = await file_relationship(client, giver, giver)

    assert response.status_code == 422
    assert response.json()["code"] == "relationship_not_allowed"
    assert response.json()["reason"] == "self"
    assert await relationship_count(db) == 0


async def test_receiver_name_must_match_the_roster(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    impostor = Member({**receiver.who, "name": "王小红"}, receiver.token)

    response = await file_relationship(client, giver, impostor)

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_receiver_missing_from_the_roster_is_not_found(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")

    response = await file_relationship(client, giver, Member(person(77, "不在册"), token=""))

    assert response.status_code == 404


async def test_receiver_in_another_province_is_refused_for_now(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")
    response = await client.post(
        "/app/v1/relationships",
        json={
            "receiver_id_number": person(9, "x")["id_number"],
            "receiver_name": "李四",
            "relation_type": "parent",
            "evidence_ref": "hukou-1",
            "payment_password": PASSWORD,
            "receiver_province": "110000",
        },
        headers=giver.auth,
    )

    assert response.status_code == 422
    assert response.json()["code"] == "relationship_not_allowed"
    assert response.json()["reason"] == "receiver_in_other_province"
    assert await relationship_count(db) == 0


async def test_wrong_payment_password_files_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")

    response = await client.post(
        "/app/v1/relationships",
        json={
            "receiver_id_number": receiver.id_number,
            "receiver_name": "王小明",
            "relation_type": "child",
            "evidence_ref": "hukou-1",
            "payment_password": "246801",
        },
        headers=giver.auth,
    )

    assert response.status_code == 403
    assert response.json()["code"] == "payment_password_wrong"
    assert await relationship_count(db) == 0


async def test_one_live_relationship_per_pair(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    # The same filing again (its answer lost) is answered with the relationship as it is.
    replay = await file_relationship(client, giver, receiver)
    assert replay.status_code == 201, replay.text
    assert (replay.json()["id"], replay.json()["state"]) == (rid, "pending_confirmation")

    # Another filing for the same pair contradicts the live one.
    response = await file_relationship(client, giver, receiver, relation_type="spouse")

    assert response.status_code == 409
    assert response.json()["code"] == "already_exists"


async def test_the_reverse_pair_is_a_separate_relationship(
    client: Client, otp: RecordingOtpSender
) -> None:
    a = await member(client, otp, 1, "王大山")
    b = await member(client, otp, 2, "李秀英")
    await share(client, a, b)

    response = await file_relationship(client, b, a, "spouse")

    assert response.status_code == 201


async def test_receiver_limit_per_giver_counts_live_relationships(
    client: Client, otp: RecordingOtpSender
) -> None:
    set_rules(client, max_receivers_per_giver=2)
    giver = await member(client, otp, 1, "王大山")
    receivers = [await member(client, otp, seq, f"王{seq}号") for seq in (2, 3, 4)]
    first = await filed(client, giver, receivers[0])
    await share(client, giver, receivers[1])

    refused = await file_relationship(client, giver, receivers[2])
    await end_relationship(client, giver, first)
    accepted = await file_relationship(client, giver, receivers[2])

    assert refused.status_code == 422
    assert refused.json()["code"] == "relationship_not_allowed"
    assert refused.json()["reason"] == "receiver_limit"
    assert accepted.status_code == 201


async def test_receiver_limit_holds_under_concurrent_filings(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    set_rules(client, max_receivers_per_giver=3)
    giver = await member(client, otp, 1, "王大山")
    receivers = [await member(client, otp, seq, f"王{seq}号") for seq in range(2, 10)]

    responses = await asyncio.gather(*(file_relationship(client, giver, r) for r in receivers))

    assert sorted(r.status_code for r in responses) == [201] * 3 + [422] * 5
    assert await relationship_count(db) == 3


# --- the receiver's answer -----------------------------------------------------------------


async def test_only_the_receiver_can_confirm(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    response = await client.post(
        f"/app/v1/relationships/{rid}/confirm",
        json={"payment_password": PASSWORD},
        headers=giver.auth,
    )

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_confirming_twice_answers_the_current_state(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await share(client, giver, receiver)

    response = await client.post(
        f"/app/v1/relationships/{rid}/confirm",
        json={"payment_password": PASSWORD},
        headers=receiver.auth,
    )

    assert response.status_code == 200, response.text
    assert (response.json()["id"], response.json()["state"]) == (rid, "active")
    confirmations = await client.get(
        "/operator/v1/audit?action=relationship.confirm", headers=OPERATOR
    )
    assert len(confirmations.json()) == 1


async def test_confirming_needs_the_receivers_payment_password(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    response = await client.post(
        f"/app/v1/relationships/{rid}/confirm",
        json={"payment_password": "246801"},
        headers=receiver.auth,
    )
    listed = await client.get("/app/v1/relationships", headers=receiver.auth)

    assert response.status_code == 403
    assert [r["state"] for r in listed.json()] == ["pending_confirmation"]


async def test_receiver_declines_and_nothing_is_shared(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山", fen=1000)
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    declined = await client.post(f"/app/v1/relationships/{rid}/decline", headers=receiver.auth)
    late_confirm = await client.post(
        f"/app/v1/relationships/{rid}/confirm",
        json={"payment_password": PASSWORD},
        headers=receiver.auth,
    )
    key = await institution(client)
    payment = await pay(client, key, receiver, 100, "visit-1")

    assert declined.status_code == 200
    assert declined.json()["state"] == "declined"
    assert late_confirm.status_code == 409
    assert payment.json()["code"] == "insufficient_funds"


async def test_after_declining_the_giver_may_file_again(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)
    await client.post(f"/app/v1/relationships/{rid}/decline", headers=receiver.auth)

    response = await file_relationship(client, giver, receiver)

    assert response.status_code == 201


async def test_pending_relationship_does_not_share(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山", fen=1000)
    receiver = await member(client, otp, 2, "王小明")
    await filed(client, giver, receiver)
    key = await institution(client)

    response = await pay(client, key, receiver, 100, "visit-1")

    assert response.json()["code"] == "insufficient_funds"


async def test_under_16_receiver_confirms_from_a_wallet_opened_by_a_guardian(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    giver = await member(client, otp, 1, "王大山", fen=1000)
    child = person(2, "王小宝", scheme="resident", birth="20150601")
    await import_persons(client, child)
    opened = await client.post(
        "/operator/v1/wallets",
        json={
            "id_number": child["id_number"],
            "name": child["name"],
            "payment_password": PASSWORD,
            "opened_via": "guardian",
            "guardian_id_number": giver.id_number,
        },
        headers=OPERATOR,
    )
    assert opened.status_code == 201, opened.text
    challenge = await client.post(
        "/app/v1/otp",
        json={"id_number": child["id_number"], "name": child["name"], "purpose": "login"},
    )
    session = await client.post(
        "/app/v1/sessions",
        json={"otp_id": challenge.json()["otp_id"], "otp_code": otp.last[child["phone"]]},
    )
    assert session.status_code == 201, session.text
    receiver = Member(child, session.json()["token"])

    rid = await filed(client, giver, receiver)
    body = await confirm(client, receiver, rid)

    assert body["state"] == "active"
    assert body["receiver_under_16_at_filing"] is True
    detail = await db.fetchval(
        "SELECT detail FROM audit_event WHERE action = 'relationship.file' AND subject = $1",
        f"relationship:{rid}",
    )
    assert json.loads(detail)["receiver_under_16"] is True


# --- operator review (RULES 5, [cfg]) ---------------------------------------------------


async def test_review_required_confirmation_waits_for_an_operator(
    client: Client, otp: RecordingOtpSender
) -> None:
    set_rules(client, relationship_review_required=True)
    giver = await member(client, otp, 1, "王大山", fen=1000)
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    body = await confirm(client, receiver, rid)
    key = await institution(client)
    payment = await pay(client, key, receiver, 100, "visit-1")
    queue = await client.get("/operator/v1/relationships?state=pending_review", headers=OPERATOR)

    assert body["state"] == "pending_review"
    assert payment.json()["code"] == "insufficient_funds"
    assert [(r["id"], r["viewer"], r["evidence_ref"]) for r in queue.json()] == [
        (rid, "operator", "hukou-0001")
    ]
    assert queue.json()[0]["giver_name_masked"] == "王**"
    assert queue.json()[0]["receiver_name_masked"] == "王**"


async def test_operator_approval_activates_and_is_audited(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    set_rules(client, relationship_review_required=True)
    giver = await member(client, otp, 1, "王大山", fen=1000)
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)
    await confirm(client, receiver, rid)

    response = await client.post(
        f"/operator/v1/relationships/{rid}/approve",
        headers={**OPERATOR, "X-Operator-Name": "reviewer-1"},
    )
    key = await institution(client)
    payment = await pay(client, key, receiver, 100, "visit-1")

    assert response.status_code == 200, response.text
    assert response.json()["state"] == "active"
    assert response.json()["reviewed_at"] is not None
    assert payment.status_code == 201
    actor = await db.fetchval(
        "SELECT actor FROM audit_event WHERE action = 'relationship.approve' AND subject = $1",
        f"relationship:{rid}",
    )
    assert actor == "reviewer-1"


async def test_operator_rejection_is_final(client: Client, otp: RecordingOtpSender) -> None:
    set_rules(client, relationship_review_required=True)
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)
    await confirm(client, receiver, rid)

    rejected = await client.post(f"/operator/v1/relationships/{rid}/reject", headers=OPERATOR)
    approved_late = await client.post(f"/operator/v1/relationships/{rid}/approve", headers=OPERATOR)

    assert rejected.json()["state"] == "rejected"
    assert approved_late.status_code == 409
    assert approved_late.json()["code"] == "state_conflict"


async def test_review_of_an_unconfirmed_or_unknown_relationship_is_refused(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    unconfirmed = await client.post(f"/operator/v1/relationships/{rid}/approve", headers=OPERATOR)
    unknown = await client.post("/operator/v1/relationships/999999/approve", headers=OPERATOR)

    assert unconfirmed.status_code == 409
    assert unknown.status_code == 404


async def test_review_endpoints_need_the_operator_token(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")

    listed = await client.get("/operator/v1/relationships", headers=giver.auth)
    approved = await client.post("/operator/v1/relationships/1/approve", headers=giver.auth)

    assert (listed.status_code, approved.status_code) == (401, 401)


# --- ending (RULES 6-8) --------------------------------------------------------------------


async def test_giver_ends_and_sharing_stops(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山", fen=1000)
    receiver = await member(client, otp, 2, "王小明")
    rid = await share(client, giver, receiver)
    key = await institution(client)
    assert (await pay(client, key, receiver, 100, "visit-1")).status_code == 201

    ended = await end_relationship(client, giver, rid)
    after = await pay(client, key, receiver, 100, "visit-2")

    assert ended.status_code == 200
    assert (ended.json()["state"], ended.json()["ended_by"]) == ("ended", "giver")
    assert after.status_code == 409
    assert after.json()["code"] == "insufficient_funds"


async def test_receiver_ends_and_sharing_stops(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山", fen=1000)
    receiver = await member(client, otp, 2, "王小明")
    rid = await share(client, giver, receiver)

    ended = await end_relationship(client, receiver, rid)
    key = await institution(client)
    after = await pay(client, key, receiver, 100, "visit-1")

    assert (ended.json()["state"], ended.json()["ended_by"]) == ("ended", "receiver")
    assert after.json()["code"] == "insufficient_funds"


async def test_giver_may_withdraw_a_filing_before_confirmation(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await filed(client, giver, receiver)

    ended = await end_relationship(client, giver, rid)
    late_confirm = await client.post(
        f"/app/v1/relationships/{rid}/confirm",
        json={"payment_password": PASSWORD},
        headers=receiver.auth,
    )

    assert ended.json()["state"] == "ended"
    assert late_confirm.status_code == 409


async def test_ending_twice_answers_the_current_state(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await share(client, giver, receiver)
    await end_relationship(client, giver, rid)

    response = await end_relationship(client, receiver, rid)

    assert response.status_code == 200, response.text
    assert (response.json()["state"], response.json()["ended_by"]) == ("ended", "giver")


async def test_an_outsider_cannot_end_a_relationship(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    outsider = await member(client, otp, 3, "赵四")
    rid = await share(client, giver, receiver)

    response = await end_relationship(client, outsider, rid)

    assert response.status_code == 404


async def test_ending_needs_the_payment_password(client: Client, otp: RecordingOtpSender) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    rid = await share(client, giver, receiver)

    response = await client.post(
        f"/app/v1/relationships/{rid}/end", json={"payment_password": "246801"}, headers=giver.auth
    )
    listed = await client.get("/app/v1/relationships", headers=giver.auth)

    assert response.status_code == 403
    assert listed.json()[0]["state"] == "active"


async def test_roster_status_change_ends_relationships(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "王小明")
    await share(client, giver, receiver)

    await import_persons(client, person(2, "王小明", status="terminated"))
    listed = await client.get("/app/v1/relationships", headers=giver.auth)

    assert [(r["state"], r["ended_by"]) for r in listed.json()] == [("ended", "system")]


# --- listing and ordering ------------------------------------------------------------------


async def test_list_filters_by_role_and_state(client: Client, otp: RecordingOtpSender) -> None:
    me = await member(client, otp, 1, "王大山")
    child = await member(client, otp, 2, "王小明")
    parent = await member(client, otp, 3, "王老汉")
    as_giver = await share(client, me, child)
    as_receiver = await filed(client, parent, me)

    def ids(response: object) -> list[int]:
        return [r["id"] for r in response.json()]  # type: ignore[attr-defined]

    everything = await client.get("/app/v1/relationships", headers=me.auth)
    giving = await client.get("/app/v1/relationships?role=giver", headers=me.auth)
    receiving = await client.get("/app/v1/relationships?role=receiver", headers=me.auth)
    pending = await client.get("/app/v1/relationships?state=pending_confirmation", headers=me.auth)

    assert ids(everything) == [as_giver, as_receiver]
    assert ids(giving) == [as_giver]
    assert ids(receiving) == [as_receiver]
    assert ids(pending) == [as_receiver]
    assert [r["viewer"] for r in everything.json()] == ["giver", "receiver"]


async def test_receiver_sets_the_order_of_their_givers(
    client: Client, otp: RecordingOtpSender
) -> None:
    receiver = await member(client, otp, 1, "王小明")
    r1 = await share(client, await member(client, otp, 2, "王大山"), receiver)
    r2 = await share(client, await member(client, otp, 3, "李秀英"), receiver)

    response = await client.put(
        "/app/v1/relationships/order", json={"relationship_ids": [r2, r1]}, headers=receiver.auth
    )

    assert response.status_code == 200, response.text
    assert [(r["id"], r["receiver_priority"]) for r in response.json()] == [(r1, 2), (r2, 1)]


async def test_ordering_someone_elses_relationship_changes_nothing(
    client: Client, otp: RecordingOtpSender, db: asyncpg.Connection
) -> None:
    receiver = await member(client, otp, 1, "王小明")
    giver = await member(client, otp, 2, "王大山")
    mine = await share(client, giver, receiver)
    theirs = await share(client, receiver, giver)

    response = await client.put(
        "/app/v1/relationships/order",
        json={"relationship_ids": [mine, theirs]},
        headers=receiver.auth,
    )

    assert response.status_code == 404
    assert (
        await db.fetchval("SELECT count(*) FROM relationship WHERE receiver_priority IS NOT NULL")
        == 0
    )


async def test_giver_sees_each_relationship_with_the_receiver_masked(
    client: Client, otp: RecordingOtpSender
) -> None:
    giver = await member(client, otp, 1, "王大山")
    receiver = await member(client, otp, 2, "欧阳小明")
    await share(client, giver, receiver)

    listed = await client.get("/app/v1/relationships", headers=giver.auth)

    text = listed.text
    assert receiver.id_number not in text and "欧阳小明" not in text
    assert listed.json()[0]["receiver_name_masked"] == "欧***"


async def test_relationship_endpoints_need_a_session(client: Client) -> None:
    response = await client.get("/app/v1/relationships", headers=bearer("sess_nope"))

    assert response.status_code == 401
