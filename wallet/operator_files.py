"""Operator files (roster, monthly credits): CSV with a header row, or JSON, read row by row.

Every refusal names the line an operator has to fix: for CSV the physical line in the file
(the header is line 1), for JSON the 1-based position in the list of rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from wallet.errors import ErrorCode, WalletError

T = TypeVar("T", bound=msgspec.Struct)

# A limit on everything: a province's roster is imported in files of at most this many rows.
MAX_FILE_ROWS = 1_000_000
MAX_FILE_BYTES = 512 * 1024 * 1024


def row_error(line: int, detail: str) -> WalletError:
    """A bad row: the code operators switch on, the line to fix, and what is wrong."""
    return WalletError(ErrorCode.ROSTER_FILE_INVALID, f"line {line}: {detail}", line=line)


@dataclass(frozen=True)
class RowFile(Generic[T]):
    """The rows of a file, and the line of each, for refusals found later (in the database)."""

    rows: list[T]
    lines: list[int]


def read_rows(path: Path, list_key: str, row_type: type[T]) -> RowFile[T]:
    """Parse `path` into rows of `row_type` and the line number of each row.

    JSON files hold a list of objects, or an object whose `list_key` member is that list.
    """
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise WalletError(ErrorCode.ROSTER_FILE_INVALID, f"{path.name} is too large")
        data = path.read_bytes()
    except OSError as exc:
        raise WalletError(ErrorCode.ROSTER_FILE_INVALID, f"cannot read {path.name}") from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        objects = _csv_objects(data, row_type.__struct_fields__)
    elif suffix == ".json":
        objects = _json_objects(data, list_key)
    else:
        raise WalletError(ErrorCode.ROSTER_FILE_INVALID, "a file must be .csv or .json")
    if len(objects) > MAX_FILE_ROWS:
        raise WalletError(
            ErrorCode.ROSTER_FILE_INVALID, f"a file holds at most {MAX_FILE_ROWS} rows"
        )
    rows = [convert_row(obj, row_type, line, strict=suffix == ".json") for line, obj in objects]
    return RowFile(rows=rows, lines=[line for line, _ in objects])


def convert_row(obj: Any, row_type: type[T], line: int, *, strict: bool) -> T:
    """One row from its decoded form; CSV cells are text, so they convert loosely."""
    try:
        return msgspec.convert(obj, row_type, strict=strict)
    except msgspec.ValidationError as exc:
        raise row_error(line, str(exc)) from exc


def _csv_objects(data: bytes, fields: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    try:
        text = data.decode("utf-8-sig")  # spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise WalletError(ErrorCode.ROSTER_FILE_INVALID, "a CSV file must be UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise WalletError(ErrorCode.ROSTER_FILE_INVALID, "the file is empty")
        header = [h.strip() for h in header]
        _check_header(header, fields)
        objects: list[tuple[int, dict[str, str]]] = []
        previous_end = reader.line_num
        for cells in reader:
            # line_num is where the record ends; it starts on the line after the last one.
            line, previous_end = previous_end + 1, reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                raise row_error(line, f"{len(cells)} fields, the header names {len(header)}")
            objects.append((line, dict(zip(header, (c.strip() for c in cells), strict=True))))
    except csv.Error as exc:
        raise row_error(reader.line_num, f"not valid CSV ({exc})") from exc
    return objects


def _check_header(header: Sequence[str], fields: Sequence[str]) -> None:
    if sorted(header) != sorted(fields):
        raise row_error(1, f"the header row names the columns {', '.join(fields)}, in any order")


def _json_objects(data: bytes, list_key: str) -> list[tuple[int, Any]]:
    try:
        document = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise WalletError(ErrorCode.ROSTER_FILE_INVALID, f"not valid JSON: {exc}") from exc
    if isinstance(document, dict):
        document = document.get(list_key)
    if not isinstance(document, list):
        raise WalletError(
            ErrorCode.ROSTER_FILE_INVALID,
            f"a JSON file holds a list of rows, or an object with a `{list_key}` list",
        )
    return list(enumerate(document, start=1))
