"""The roster: imports (API and files), line numbers of bad rows, status changes (RULES 6)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import OPERATOR, import_persons, make_id_number, person
from tests.wallet.service_context import wallet_context
from wallet import roster
from wallet.clock import ManualClock
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.otp import RecordingOtpSender

Client = AsyncTestClient[Litestar]

FATHER = person(1, "张三丰")
CHILD = person(2, "张小宝", scheme="resident", birth="20150601")


@pytest.fixture
async def ctx(
    database_url: str, clock: ManualClock, otp: RecordingOtpSender
) -> AsyncIterator[WalletContext]:
    async with wallet_context(database_url, clock, otp) as context:
        yield context


async def _person_row(db: asyncpg.Connection, id_number: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM insured_person WHERE id_number = $1", id_number)
    assert row is not None
    return row


async def _refusal(client: Client, *persons: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(
        "/operator/v1/roster", json={"persons": list(persons)}, headers=OPERATOR
    )
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    return body


async def _relationship(db: asyncpg.Connection, giver_id: int, receiver_id: int, state: str) -> int:
    relationship_id: int = await db.fetchval(
        "INSERT INTO relationship (giver_person_id, receiver_person_id, relation_type, evidence_ref,"
        " state, filed_at) VALUES ($1, $2, 'child', 'HK-1', $3, now()) RETURNING id",
        giver_id,
        receiver_id,
        state,
    )
    return relationship_id


# --- import through the API ----------------------------------------------------------------


async def test_import_creates_persons_and_counts_them(
    client: Client, db: asyncpg.Connection
) -> None:
    assert await import_persons(client, FATHER, CHILD) == {"created": 2, "updated": 0}
    father = await _person_row(db, FATHER["id_number"])
    assert (father["name"], father["scheme"], father["status"]) == ("张三丰", "employee", "normal")


async def test_employee_gets_a_personal_account_and_resident_does_not(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, CHILD)
    father = await _person_row(db, FATHER["id_number"])
    child = await _person_row(db, CHILD["id_number"])
    account = await db.fetchrow(
        "SELECT kind, code FROM account WHERE id = $1", father["personal_account_id"]
    )
    assert (account["kind"], account["code"]) == ("personal", f"personal:{FATHER['id_number']}")
    assert child["personal_account_id"] is None


async def test_reimport_counts_only_changed_persons_as_updated(client: Client) -> None:
    await import_persons(client, FATHER, CHILD)
    newcomer = person(3, "李四")
    result = await import_persons(client, {**FATHER, "phone": "13900000000"}, CHILD, newcomer)
    assert result == {"created": 1, "updated": 1}


async def test_roster_name_overrides_a_different_stored_name(client: Client) -> None:
    await import_persons(client, FATHER)
    await import_persons(client, {**FATHER, "name": "张三"})
    response = await client.get(f"/operator/v1/persons/{FATHER['id_number']}", headers=OPERATOR)
    assert response.json()["name"] == "张三"


async def test_lowercase_x_is_stored_uppercase(client: Client, db: asyncpg.Connection) -> None:
    someone = {**person(4, "王五"), "id_number": "11010519491231002x"}
    await import_persons(client, someone)
    assert await db.fetchval("SELECT id_number FROM insured_person") == "11010519491231002X"


async def test_resident_who_becomes_employee_gets_a_personal_account(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, CHILD)
    await import_persons(client, {**CHILD, "scheme": "employee"})
    assert (await _person_row(db, CHILD["id_number"]))["personal_account_id"] is not None


async def test_employee_who_becomes_resident_keeps_the_personal_account(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER)
    account_id = (await _person_row(db, FATHER["id_number"]))["personal_account_id"]
    await import_persons(client, {**FATHER, "scheme": "resident"})
    assert (await _person_row(db, FATHER["id_number"]))["personal_account_id"] == account_id


async def test_wrong_check_character_refuses_the_import_with_its_line(
    client: Client, db: asyncpg.Connection
) -> None:
    bad = {**person(5, "赵六"), "id_number": "110105194912310021"}
    body = await _refusal(client, FATHER, bad)
    assert (body["code"], body["line"]) == ("roster_file_invalid", 2)
    assert "check character" in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM insured_person") == 0


async def test_pooling_region_of_another_province_is_refused_with_its_line(
    client: Client, db: asyncpg.Connection
) -> None:
    body = await _refusal(client, FATHER, CHILD, person(6, "钱七", pooling_region="310100"))
    assert (body["code"], body["line"]) == ("roster_file_invalid", 3)
    assert "not in province 130000" in body["detail"]
    assert await db.fetchval("SELECT count(*) FROM insured_person") == 0


async def test_repeated_id_number_in_one_import_is_refused_with_its_line(client: Client) -> None:
    body = await _refusal(client, FATHER, CHILD, {**FATHER, "name": "张三"})
    assert (body["code"], body["line"]) == ("roster_file_invalid", 3)
    assert "already appears on line 1" in body["detail"]


# --- roster files --------------------------------------------------------------------------


def _csv(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "roster.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _csv_line(p: dict[str, Any]) -> str:
    return ",".join(p[k] for k in roster.RosterRow.__struct_fields__)


HEADER = ",".join(roster.RosterRow.__struct_fields__)


def _file_refusal(path: Path) -> WalletError:
    with pytest.raises(WalletError) as caught:
        roster.parse_roster_file(path)
    assert caught.value.code is ErrorCode.ROSTER_FILE_INVALID
    return caught.value


def test_csv_file_rows_are_read_in_canonical_form(tmp_path: Path) -> None:
    lower_x = {**person(7, "孙八"), "id_number": "11010519491231002x"}
    rows = roster.parse_roster_file(_csv(tmp_path, HEADER, _csv_line(FATHER), _csv_line(lower_x)))
    assert [r.id_number for r in rows] == [FATHER["id_number"], "11010519491231002X"]
    assert rows[0] == roster.RosterRow(**FATHER)


def test_csv_bad_row_names_its_physical_line(tmp_path: Path) -> None:
    bad = {**person(5, "赵六"), "id_number": "110105194912310021"}
    path = _csv(tmp_path, HEADER, _csv_line(FATHER), "", _csv_line(CHILD), _csv_line(bad))
    error = _file_refusal(path)
    assert error.extensions == {"line": 5}
    assert error.detail == "line 5: the check character of the ID number is wrong"


def test_csv_row_with_a_missing_field_names_its_line(tmp_path: Path) -> None:
    short = _csv_line(CHILD).rsplit(",", 1)[0]
    assert _file_refusal(_csv(tmp_path, HEADER, _csv_line(FATHER), short)).extensions == {"line": 3}


def test_csv_header_must_name_exactly_the_columns(tmp_path: Path) -> None:
    for header in (HEADER + ",email", HEADER.replace(",phone", ""), HEADER + ",name"):
        error = _file_refusal(_csv(tmp_path, header, _csv_line(FATHER)))
        assert error.extensions == {"line": 1}, header
        assert "the header row names the columns id_number, name, scheme" in error.detail


def test_json_file_is_a_list_or_a_persons_object(tmp_path: Path) -> None:
    listed, wrapped = tmp_path / "a.json", tmp_path / "b.json"
    listed.write_text(json.dumps([FATHER, CHILD]), encoding="utf-8")
    wrapped.write_text(json.dumps({"persons": [FATHER, CHILD]}), encoding="utf-8")
    assert roster.parse_roster_file(listed) == roster.parse_roster_file(wrapped)
    assert len(roster.parse_roster_file(listed)) == 2


def test_json_bad_row_names_its_position_in_the_list(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    bad = {**CHILD, "status": "retired"}
    path.write_text(json.dumps({"persons": [FATHER, person(3, "李四"), bad]}), encoding="utf-8")
    error = _file_refusal(path)
    assert error.extensions == {"line": 3}
    assert "Invalid enum value 'retired'" in error.detail


def test_json_bad_check_character_names_its_position(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    bad = {**CHILD, "id_number": "110105194912310021"}
    path.write_text(json.dumps([bad]), encoding="utf-8")
    assert _file_refusal(path).extensions == {"line": 1}


def test_file_of_another_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "roster.xlsx"
    path.write_bytes(b"PK")
    assert "must be .csv or .json" in _file_refusal(path).detail


async def test_import_names_the_file_line_of_a_foreign_pooling_region(
    ctx: WalletContext, tmp_path: Path, db: asyncpg.Connection
) -> None:
    foreign = person(6, "钱七", pooling_region="310100")
    found = roster.read_roster_file(_csv(tmp_path, HEADER, _csv_line(FATHER), _csv_line(foreign)))
    with pytest.raises(WalletError) as caught:
        await roster.import_rows(ctx, found.rows, lines=found.lines)
    assert (caught.value.code, caught.value.extensions) == (
        ErrorCode.ROSTER_FILE_INVALID,
        {"line": 3},
    )
    assert await db.fetchval("SELECT count(*) FROM insured_person") == 0


async def test_import_commits_in_chunks_and_reports_each(
    ctx: WalletContext, db: asyncpg.Connection
) -> None:
    rows = [roster.RosterRow(**person(i, f"人{i}")) for i in range(1, 6)]
    done: list[int] = []
    result = await roster.import_rows(ctx, rows, chunk_size=2, progress=done.append)
    assert result == roster.ImportResult(created=5, updated=0)
    assert done == [2, 2, 1]
    assert await db.fetchval("SELECT count(*) FROM account WHERE kind = 'personal'") == 5
    assert await db.fetchval("SELECT count(*) FROM audit_event WHERE action = 'roster.import'") == 3


# --- statuses and relationships (RULES 6) ----------------------------------------------------


async def test_status_change_to_deceased_ends_live_relationships(
    client: Client, db: asyncpg.Connection
) -> None:
    other = person(3, "李四")
    await import_persons(client, FATHER, CHILD, other)
    father = (await _person_row(db, FATHER["id_number"]))["id"]
    child = (await _person_row(db, CHILD["id_number"]))["id"]
    other_id = (await _person_row(db, other["id_number"]))["id"]
    live = await _relationship(db, father, child, "active")
    declined = await _relationship(db, other_id, father, "declined")

    response = await client.patch(
        f"/operator/v1/persons/{FATHER['id_number']}", json={"status": "deceased"}, headers=OPERATOR
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "deceased"
    rows = {r["id"]: r for r in await db.fetch("SELECT * FROM relationship")}
    assert (rows[live]["state"], rows[live]["ended_by"]) == ("ended", "system")
    assert rows[live]["end_reason"] == "insured status changed to deceased"
    assert rows[declined]["state"] == "declined"


async def test_status_change_writes_an_audit_event(client: Client, db: asyncpg.Connection) -> None:
    await import_persons(client, FATHER)
    await client.patch(
        f"/operator/v1/persons/{FATHER['id_number']}",
        json={"status": "suspended"},
        headers={**OPERATOR, "X-Operator-Name": "clerk-7", "X-Request-ID": "req-1"},
    )
    event = await db.fetchrow("SELECT * FROM audit_event WHERE action = 'person.set_status'")
    assert (event["actor"], event["request_id"]) == ("clerk-7", "req-1")
    person_id = (await _person_row(db, FATHER["id_number"]))["id"]
    assert event["subject"] == f"person:{person_id}"
    detail = json.loads(event["detail"])
    assert detail == {
        "status_before": "normal",
        "status_after": "suspended",
        "relationships_ended": [],
    }


async def test_import_that_terminates_a_person_ends_their_relationships(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, CHILD)
    father = (await _person_row(db, FATHER["id_number"]))["id"]
    child = (await _person_row(db, CHILD["id_number"]))["id"]
    live = await _relationship(db, father, child, "pending_confirmation")
    await import_persons(client, {**CHILD, "status": "terminated"})
    assert await db.fetchval("SELECT state FROM relationship WHERE id = $1", live) == "ended"


async def test_moving_to_another_pooling_region_ends_relationships(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, CHILD)
    father = (await _person_row(db, FATHER["id_number"]))["id"]
    child = (await _person_row(db, CHILD["id_number"]))["id"]
    live = await _relationship(db, father, child, "active")
    await import_persons(client, {**FATHER, "pooling_region": "130200"})
    row = await db.fetchrow("SELECT state, end_reason FROM relationship WHERE id = $1", live)
    assert (row["state"], row["end_reason"]) == ("ended", "moved to pooling region 130200")


async def test_phone_change_leaves_relationships_alone(
    client: Client, db: asyncpg.Connection
) -> None:
    await import_persons(client, FATHER, CHILD)
    father = (await _person_row(db, FATHER["id_number"]))["id"]
    child = (await _person_row(db, CHILD["id_number"]))["id"]
    live = await _relationship(db, father, child, "active")
    await import_persons(client, {**FATHER, "phone": "13900000000"})
    assert await db.fetchval("SELECT state FROM relationship WHERE id = $1", live) == "active"


async def test_person_view_shows_wallet_and_balance(client: Client) -> None:
    await import_persons(client, FATHER)
    response = await client.get(f"/operator/v1/persons/{FATHER['id_number']}", headers=OPERATOR)
    assert response.status_code == 200
    body = response.json()
    assert body["wallet_state"] is None
    assert body["personal_account"] == {"available_fen": 0, "pending_fen": 0, "posted_fen": 0}
    assert dt.datetime.fromisoformat(body["updated_at"])


async def test_unknown_person_is_not_found(client: Client) -> None:
    response = await client.get(f"/operator/v1/persons/{make_id_number(99)}", headers=OPERATOR)
    assert (response.status_code, response.json()["code"]) == (404, "not_found")


async def test_roster_needs_the_operator_token(client: Client, db: asyncpg.Connection) -> None:
    response = await client.post(
        "/operator/v1/roster", json={"persons": [FATHER]}, headers={"Authorization": "Bearer nope"}
    )
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
    assert await db.fetchval("SELECT count(*) FROM insured_person") == 0
