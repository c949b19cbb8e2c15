"""Migrations are forward-only, numbered, and refuse edited or unknown history."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from nodes.migrate import MigrationError, discover, migrate


def _write(folder: Path, name: str, sql: str) -> None:
    (folder / name).write_text(sql)


async def test_applies_each_file_once(db: asyncpg.Connection, tmp_path: Path) -> None:
    _write(tmp_path, "0001_a.sql", "CREATE TABLE mig_a (x int);")
    _write(tmp_path, "0002_b.sql", "CREATE TABLE mig_b (x int);")
    await db.execute("DROP TABLE schema_migration")  # a database of its own history
    assert await migrate(db, tmp_path) == [1, 2]
    assert await migrate(db, tmp_path) == []


async def test_edited_migration_is_refused(db: asyncpg.Connection, tmp_path: Path) -> None:
    await db.execute("DROP TABLE schema_migration")
    _write(tmp_path, "0001_a.sql", "CREATE TABLE mig_a (x int);")
    await migrate(db, tmp_path)
    _write(tmp_path, "0001_a.sql", "CREATE TABLE mig_a (x bigint);")
    with pytest.raises(MigrationError, match="edited"):
        await migrate(db, tmp_path)


async def test_database_newer_than_code_is_refused(db: asyncpg.Connection, tmp_path: Path) -> None:
    await db.execute("DROP TABLE schema_migration")
    _write(tmp_path, "0001_a.sql", "SELECT 1;")
    _write(tmp_path, "0002_b.sql", "SELECT 2;")
    await migrate(db, tmp_path)
    (tmp_path / "0002_b.sql").unlink()
    with pytest.raises(MigrationError, match="newer"):
        await migrate(db, tmp_path)


async def test_failed_migration_leaves_nothing_behind(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    await db.execute("DROP TABLE schema_migration")
    _write(tmp_path, "0001_a.sql", "CREATE TABLE mig_half (x int); SELECT no_such_function();")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(db, tmp_path)
    assert await db.fetchval("SELECT to_regclass('mig_half')") is None
    assert await db.fetchval("SELECT count(*) FROM schema_migration") == 0


def test_gap_in_numbering_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "0001_a.sql", "SELECT 1;")
    _write(tmp_path, "0003_c.sql", "SELECT 3;")
    with pytest.raises(MigrationError, match="0002 is missing"):
        discover(tmp_path)


def test_stray_file_name_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "1_init.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


def test_an_empty_migrations_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations in"):
        discover(tmp_path)
