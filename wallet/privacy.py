"""Masking of personal data: ID numbers and names never appear whole in logs or peers' views."""

from __future__ import annotations

import re

_ID_LIKE = re.compile(r"\b([0-9]{4})[0-9]{10}([0-9]{3}[0-9Xx])\b")


def mask_id_number(id_number: str) -> str:
    """`11010519491231002X` -> `1101**********002X`."""
    if len(id_number) < 8:
        return "*" * len(id_number)
    return id_number[:4] + "*" * (len(id_number) - 8) + id_number[-4:]


def mask_name(name: str) -> str:
    """`张三丰` -> `张**`; a one-character name is fully masked."""
    if len(name) <= 1:
        return "*"
    return name[0] + "*" * (len(name) - 1)


def mask_phone(phone: str) -> str:
    """`13800138000` -> `138****8000`."""
    if len(phone) < 7:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def scrub_text(text: str) -> str:
    """Mask anything shaped like an 18-character ID number inside free text."""
    return _ID_LIKE.sub(lambda m: m[1] + "*" * 10 + m[2], text)
