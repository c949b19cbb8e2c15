"""ID numbers (RULES 21): GB 11643 check character, permits, and what is refused."""

from __future__ import annotations

import pytest

from wallet.errors import ErrorCode, WalletError
from wallet.idnumber import check_character, is_valid_id_number, normalize_id_number


def _with_check(first17: str) -> str:
    return first17 + check_character(first17)


def _refusal(raw: str) -> str:
    with pytest.raises(WalletError) as caught:
        normalize_id_number(raw)
    assert caught.value.code is ErrorCode.ID_NUMBER_INVALID
    return caught.value.detail


def test_worked_example_of_the_standard_is_valid() -> None:
    assert normalize_id_number("11010519491231002X") == "11010519491231002X"


def test_lowercase_x_is_accepted_and_normalised_to_uppercase() -> None:
    assert normalize_id_number("11010519491231002x") == "11010519491231002X"


def test_surrounding_whitespace_is_ignored() -> None:
    assert normalize_id_number(" 11010519491231002X\n") == "11010519491231002X"


def test_wrong_check_character_is_refused() -> None:
    assert _refusal("110105194912310021") == "the check character of the ID number is wrong"


def test_fifteen_digit_numbers_are_refused() -> None:
    assert "15-digit" in _refusal("110105491231002")


def test_impossible_birth_date_is_refused_even_with_right_check_character() -> None:
    assert "birth date" in _refusal(_with_check("11010519490231002"))


def test_letters_inside_the_number_are_refused() -> None:
    assert "17 digits" in _refusal("1101051949123100AX")


@pytest.mark.parametrize("prefix", ["81", "82", "83"])
def test_residence_permits_are_valid_with_right_check_character(prefix: str) -> None:
    number = _with_check(f"{prefix}0000199001010012"[:17])
    assert normalize_id_number(number) == number


def test_foreigner_permanent_residence_card_is_valid_with_right_check_character() -> None:
    number = _with_check("93315619850308001")
    assert normalize_id_number(number) == number


def test_permit_with_wrong_check_character_is_refused() -> None:
    number = _with_check("81000019900101001")
    wrong = number[:17] + ("0" if number[17] != "0" else "1")
    assert not is_valid_id_number(wrong)
