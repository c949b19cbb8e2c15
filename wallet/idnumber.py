"""Resident ID numbers (GB 11643-1999) and the permits accepted beside them (RULES 21-22).

An ID number says where a hukou was first registered, never where the person is insured:
nothing here is used for routing (RULES 22).
"""

from __future__ import annotations

import datetime as dt
import re

from wallet.errors import ErrorCode, WalletError

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARS = "10X98765432"
_SHAPE = re.compile(r"^[0-9]{17}[0-9X]$")
# Hong Kong / Macao / Taiwan residence permits (prefixes 81, 82, 83) and the 2023 foreigner
# permanent-residence card (first digit 9) share the 18-character layout, the birth date
# and the check character, so one validation serves all of them.


def check_character(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character for the first 17 digits."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def normalize_id_number(raw: str) -> str:
    """Validate an ID number and return it in canonical form (uppercase X).

    Raises `WalletError(id_number_invalid)` naming what is wrong.
    """
    value = raw.strip().upper()
    if len(value) == 15 and value.isdigit():
        raise WalletError(
            ErrorCode.ID_NUMBER_INVALID,
            "15-digit ID numbers are no longer accepted; use the 18-character number",
        )
    if not _SHAPE.match(value):
        raise WalletError(
            ErrorCode.ID_NUMBER_INVALID,
            "an ID number is 17 digits followed by a digit or X",
        )
    expected = check_character(value[:17])
    if value[17] != expected:
        raise WalletError(
            ErrorCode.ID_NUMBER_INVALID, "the check character of the ID number is wrong"
        )
    if value[:2] == "00":
        raise WalletError(
            ErrorCode.ID_NUMBER_INVALID, "the address code of the ID number is not valid"
        )
    try:
        birth_date(value)
    except ValueError as exc:
        raise WalletError(
            ErrorCode.ID_NUMBER_INVALID, "the birth date in the ID number is not a real date"
        ) from exc
    return value


def birth_date(id_number: str) -> dt.date:
    """The birth date encoded in positions 7-14."""
    return dt.datetime.strptime(id_number[6:14], "%Y%m%d").date()


def age_on(id_number: str, day: dt.date) -> int:
    born = birth_date(id_number)
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def is_valid_id_number(raw: str) -> bool:
    try:
        normalize_id_number(raw)
    except WalletError:
        return False
    return True
