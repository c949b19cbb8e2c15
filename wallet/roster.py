"""The province's roster of insured persons: import, status changes, look-up (RULES 1, 6, 21-22).

The roster is authoritative: an import creates unknown persons and overwrites the name,
scheme, status, pooling region and phone of known ones. A person who stops being in normal
status, or moves to another pooling region, loses every live relationship in the same
transaction (RULES 6). Employee-scheme persons get a personal account; it is kept if they
later change scheme, because the balance is still theirs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal, get_args

import asyncpg
import msgspec
import structlog

from wallet import audit, ledger
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.idnumber import normalize_id_number
from wallet.operator_files import RowFile, convert_row, read_rows, row_error
from wallet.plt.relations import end_cross_for_person
from wallet.records import AccountBalance
from wallet.relationships import end_all_for_person

log = structlog.get_logger("wallet.roster")

Scheme = Literal["employee", "resident"]
PersonStatus = Literal["normal", "suspended", "terminated", "deceased"]
WalletStateName = Literal["open", "closed"]

IdNumberText = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
DEFAULT_CHUNK_SIZE = 1000
MAX_CHUNK_SIZE = 10_000
# Serialises roster writers, so that "is this id number new?" has one answer per chunk.
_ROSTER_LOCK_KEY = 0x524F_5354  # "ROST"


class RosterRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One insured person as the province's roster file states them."""

    id_number: IdNumberText
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    scheme: Scheme
    status: PersonStatus
    # The insured region (GB/T 2260, 6 digits); its first two digits are this province's.
    pooling_region: Annotated[str, msgspec.Meta(pattern="^[0-9]{6}$")]
    phone: Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9]{5,20}$")]


class ImportResult(msgspec.Struct, frozen=True):
    created: int
    # Known persons whose roster data changed; unchanged rows count in neither.
    updated: int


class PersonView(msgspec.Struct, frozen=True):
    """A person as an operator sees them."""

    id_number: str
    name: str
    scheme: Scheme
    status: PersonStatus
    pooling_region: str
    phone: str
    wallet_state: WalletStateName | None
    personal_account: AccountBalance | None
    updated_at: dt.datetime


class _Known(msgspec.Struct, frozen=True):
    """A person already on the roster, as stored before this import."""

    id: int
    has_account: bool
    row: RosterRow


_LOCK_ROSTER = "SELECT pg_advisory_xact_lock($1)"
# NO KEY UPDATE: the roster never changes a person's id, so it need not block the foreign-key
# checks of a relationship filing or a payment that only reference the person.
_LOCK_KNOWN = """
SELECT id, id_number, name, scheme, status, pooling_region, phone,
       personal_account_id IS NOT NULL AS has_account
FROM insured_person WHERE id_number = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE
"""
_INSERT_PERSONS = """
INSERT INTO insured_person
    (id_number, name, scheme, status, pooling_region, phone, created_at, updated_at)
SELECT u.id_number, u.name, u.scheme, u.status, u.pooling_region, u.phone, $7, $7
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS u(id_number, name, scheme, status, pooling_region, phone)
"""
_UPDATE_PERSONS = """
UPDATE insured_person p
SET name = u.name, scheme = u.scheme, status = u.status, pooling_region = u.pooling_region,
    phone = u.phone, updated_at = $7
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS u(id_number, name, scheme, status, pooling_region, phone)
WHERE p.id_number = u.id_number
"""
# One statement for a whole chunk: personal accounts never overdraw, as
# wallet.ledger.open_account makes them.
_OPEN_PERSONAL_ACCOUNTS = """
WITH opened AS (
    INSERT INTO account (kind, code, debits_must_not_exceed_credits)
    SELECT 'personal', 'personal:' || u.id_number, true FROM unnest($1::text[]) AS u(id_number)
    RETURNING id, code
)
UPDATE insured_person p SET personal_account_id = o.id
FROM opened o WHERE o.code = 'personal:' || p.id_number
"""
_LOCK_PERSON = """
SELECT id, status FROM insured_person WHERE id_number = $1 FOR NO KEY UPDATE
"""
_SET_STATUS = "UPDATE insured_person SET status = $2, updated_at = $3 WHERE id = $1"
_PERSON_VIEW = """
SELECT p.id_number, p.name, p.scheme, p.status, p.pooling_region, p.phone, p.updated_at,
       p.personal_account_id, w.state AS wallet_state
FROM insured_person p LEFT JOIN wallet w ON w.person_id = p.id
WHERE p.id_number = $1
"""


def read_roster_file(path: Path) -> RowFile[RosterRow]:
    """Read and check a roster file (CSV with a header row, or JSON `{"persons": [...]}`).

    Raises `roster_file_invalid` with the `line` of the first bad row. Pass the result's
    `lines` to `import_rows` so that refusals found there (pooling region) carry file lines.
    """
    found = read_rows(path, "persons", RosterRow)
    return RowFile(rows=validate_rows(found.rows, found.lines, None), lines=found.lines)


def parse_roster_file(path: Path) -> list[RosterRow]:
    """The checked rows of a roster file (see `read_roster_file`)."""
    return read_roster_file(path).rows


def validate_rows(
    rows: Sequence[RosterRow], lines: Sequence[int], province_code: str | None
) -> list[RosterRow]:
    """Rows in canonical form (ID numbers with uppercase X), or the first bad row's refusal."""
    seen: dict[str, int] = {}
    valid: list[RosterRow] = []
    for row, line in zip(rows, lines, strict=True):
        # Rows built in Python skip msgspec's decoding checks: run them once more.
        row = convert_row(msgspec.structs.asdict(row), RosterRow, line, strict=True)
        try:
            id_number = normalize_id_number(row.id_number)
        except WalletError as exc:
            raise row_error(line, exc.detail) from exc
        if not row.name.strip():
            raise row_error(line, "the name is blank")
        if province_code is not None and row.pooling_region[:2] != province_code[:2]:
            raise row_error(
                line, f"pooling region {row.pooling_region} is not in province {province_code}"
            )
        if id_number in seen:
            raise row_error(line, f"the ID number already appears on line {seen[id_number]}")
        seen[id_number] = line
        valid.append(msgspec.structs.replace(row, id_number=id_number, name=row.name.strip()))
    return valid


async def import_rows(
    ctx: WalletContext,
    rows: Sequence[RosterRow],
    *,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lines: Sequence[int] | None = None,
    actor: str = "operator",
    request_id: str | None = None,
) -> ImportResult:
    """Create or update persons from roster rows, `chunk_size` rows per transaction.

    Every row is checked before anything is written: a bad row refuses the whole import
    (`roster_file_invalid` with `line`: `lines[i]` if given, else the row's 1-based position).
    Each chunk commits on its own and then `progress` receives its number of rows; an
    interrupted import is finished by running it again (the import is an upsert).
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise WalletError(ErrorCode.INVALID_REQUEST, f"chunk_size must be 1..{MAX_CHUNK_SIZE}")
    positions = lines if lines is not None else range(1, len(rows) + 1)
    valid = validate_rows(rows, positions, ctx.province_code)
    created = updated = 0
    for start in range(0, len(valid), chunk_size):
        chunk = valid[start : start + chunk_size]
        async with ctx.pool.acquire() as conn, conn.transaction():
            c, u = await _import_chunk(ctx, conn, chunk, ctx.clock.now(), actor, request_id)
        created, updated = created + c, updated + u
        if progress is not None:
            progress(len(chunk))
    log.info("roster_imported", rows=len(valid), created=created, updated=updated)
    return ImportResult(created=created, updated=updated)


async def _import_chunk(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    chunk: list[RosterRow],
    now: dt.datetime,
    actor: str,
    request_id: str | None,
) -> tuple[int, int]:
    await conn.execute(_LOCK_ROSTER, _ROSTER_LOCK_KEY)
    known = {
        r["id_number"]: _Known(
            id=r["id"],
            has_account=r["has_account"],
            row=RosterRow(**{k: r[k] for k in RosterRow.__struct_fields__}),
        )
        for r in await conn.fetch(_LOCK_KNOWN, [row.id_number for row in chunk])
    }
    new = [row for row in chunk if row.id_number not in known]
    changed = [row for row in chunk if row.id_number in known and known[row.id_number].row != row]
    if new:
        await conn.execute(_INSERT_PERSONS, *_columns(new), now)
    if changed:
        await conn.execute(_UPDATE_PERSONS, *_columns(changed), now)
    needs_account = [
        row.id_number
        for row in chunk
        if row.scheme == "employee"
        and (row.id_number not in known or not known[row.id_number].has_account)
    ]
    if needs_account:
        await conn.execute(_OPEN_PERSONAL_ACCOUNTS, needs_account)
    ended = await _end_relationships_of_leavers(ctx, conn, changed, known, now)
    await audit.record(
        conn,
        at=now,
        actor=actor,
        action="roster.import",
        subject=None,
        request_id=request_id,
        created=len(new),
        updated=len(changed),
        relationships_ended=ended,
    )
    return len(new), len(changed)


def _columns(rows: list[RosterRow]) -> tuple[list[str], ...]:
    return tuple([getattr(row, name) for row in rows] for name in RosterRow.__struct_fields__)


async def _end_relationships_of_leavers(
    ctx: WalletContext,
    conn: asyncpg.Connection,
    changed: list[RosterRow],
    known: dict[str, _Known],
    now: dt.datetime,
) -> list[int]:
    ended: list[int] = []
    for row in changed:
        before = known[row.id_number]
        reason = _end_reason(before.row, row)
        if reason is not None:
            ended += await end_all_for_person(conn, before.id, reason=reason, now=now)
            # Cross-province ones too (RULES 6); the peers are told with REL_END.
            await end_cross_for_person(ctx, conn, before.id, reason=reason, now=now)
    return ended


def _end_reason(before: RosterRow, after: RosterRow) -> str | None:
    """Why a roster change ends a person's relationships (RULES 6), or None if it does not."""
    if before.status == "normal" and after.status != "normal":
        return _status_reason(after.status)
    if before.pooling_region != after.pooling_region:
        return f"moved to pooling region {after.pooling_region}"
    return None


def _status_reason(status: str) -> str:
    return f"insured status changed to {status}"


async def set_status(
    ctx: WalletContext,
    id_number: str,
    status: str,
    *,
    actor: str,
    request_id: str | None = None,
) -> PersonView:
    """Change a person's insured status; leaving normal status ends their relationships."""
    id_number = normalize_id_number(id_number)
    if status not in get_args(PersonStatus):
        raise WalletError(ErrorCode.INVALID_REQUEST, f"unknown insured status {status!r}")
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        person = await conn.fetchrow(_LOCK_PERSON, id_number)
        if person is None:
            raise WalletError(ErrorCode.NOT_FOUND, "no insured person has this ID number")
        await conn.execute(_SET_STATUS, person["id"], status, now)
        ended: list[int] = []
        if person["status"] == "normal" and status != "normal":
            reason = _status_reason(status)
            ended = await end_all_for_person(conn, person["id"], reason=reason, now=now)
            # Cross-province ones too (RULES 6); the peers are told with REL_END.
            await end_cross_for_person(ctx, conn, person["id"], reason=reason, now=now)
        await audit.record(
            conn,
            at=now,
            actor=actor,
            action="person.set_status",
            subject=f"person:{person['id']}",
            request_id=request_id,
            status_before=person["status"],
            status_after=status,
            relationships_ended=ended,
        )
        view = await _person_view(conn, id_number)
    log.info("person_status_set", person_id=person["id"], to=status, ended=len(ended))
    return view


async def get_person(ctx: WalletContext, id_number: str) -> PersonView:
    """A person of the roster with their wallet state and personal account balance."""
    id_number = normalize_id_number(id_number)
    async with ctx.pool.acquire() as conn:
        return await _person_view(conn, id_number)


async def _person_view(conn: asyncpg.Connection, id_number: str) -> PersonView:
    row = await conn.fetchrow(_PERSON_VIEW, id_number)
    if row is None:
        raise WalletError(ErrorCode.NOT_FOUND, "no insured person has this ID number")
    account = None
    if row["personal_account_id"] is not None:
        account = AccountBalance.of(await ledger.balance(conn, row["personal_account_id"]))
    return PersonView(
        id_number=row["id_number"],
        name=row["name"],
        scheme=row["scheme"],
        status=row["status"],
        pooling_region=row["pooling_region"],
        phone=row["phone"],
        wallet_state=row["wallet_state"],
        personal_account=account,
        updated_at=row["updated_at"],
    )
