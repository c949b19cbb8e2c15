"""The per-province rules of docs/rules.md marked `[cfg]`, and the fixed rules beside them.

A province operator sets these in the node's settings file; nothing here is hard-coded
elsewhere. Defaults follow the national texts (docs/rules.md lists them).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import msgspec


class RelationType(StrEnum):
    """The eight close relatives of 民法典 art. 1045 (RULES 2). In-laws are not among them."""

    SPOUSE = "spouse"
    PARENT = "parent"
    CHILD = "child"
    SIBLING = "sibling"
    GRANDPARENT_PATERNAL = "grandparent_paternal"
    GRANDPARENT_MATERNAL = "grandparent_maternal"
    GRANDCHILD_PATERNAL = "grandchild_paternal"
    GRANDCHILD_MATERNAL = "grandchild_maternal"


class SettlementCategory(StrEnum):
    """What an institution may charge to shared money (RULES 17), and what it never may."""

    OUTPATIENT = "outpatient"
    INPATIENT = "inpatient"
    PHARMACY_DRUG = "pharmacy_drug"
    MEDICAL_DEVICE = "medical_device"
    MEDICAL_CONSUMABLE = "medical_consumable"
    RESIDENT_PREMIUM = "resident_premium"
    LONG_TERM_CARE_PREMIUM = "long_term_care_premium"
    HEALTH_CHECKUP = "health_checkup"
    # Never payable from personal accounts or shared money; listed so that institutions get
    # a precise refusal instead of "unknown category".
    CASH = "cash"
    PUBLIC_HEALTH = "public_health"
    FITNESS = "fitness"
    WELLNESS_PRODUCT = "wellness_product"
    COMMERCIAL_INSURANCE = "commercial_insurance"


FORBIDDEN_CATEGORIES: frozenset[SettlementCategory] = frozenset(
    {
        SettlementCategory.CASH,
        SettlementCategory.PUBLIC_HEALTH,
        SettlementCategory.FITNESS,
        SettlementCategory.WELLNESS_PRODUCT,
        SettlementCategory.COMMERCIAL_INSURANCE,
    }
)

DeductionStrategy = Literal["filing_order", "giver_balance_desc", "receiver_order"]


class ProvinceRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-province settings of docs/rules.md (`[cfg]`)."""

    # RULES 2: which close-relative types the province accepts in-province.
    allowed_relation_types: tuple[RelationType, ...] = tuple(RelationType)
    # RULES 4: at most this many receivers per giver (None: no limit).
    max_receivers_per_giver: int | None = None
    # RULES 5: an operator reviews a confirmed relationship before it takes effect.
    relationship_review_required: bool = False
    # RULES 17: health check-ups payable from shared money.
    health_checkups_allowed: bool = False
    # RULES 19: order in which givers' accounts are drawn after the patient's own.
    deduction_strategy: DeductionStrategy = "filing_order"
    # RULES 12-13: cross-province grants.
    grant_max_fen: int = 200_000
    grants_per_giver_per_day: int = 3
    grant_blackout_start_hour: int = 22
    grant_blackout_end_hour: int = 6
    grant_expiry_hour: int = 6
    allow_regrant: bool = False
    timezone: str = "Asia/Shanghai"
    # Wallet security.
    payment_code_ttl_s: int = 60
    session_ttl_s: int = 1800
    otp_ttl_s: int = 300
    otp_max_attempts: int = 5
    password_max_failures: int = 5
    password_lockout_s: int = 900
    # Device keys (issue 9): registered keys per person, and how old a device signature may
    # be when it reaches the node (a phone's clock may also run this far ahead).
    devices_per_person: int = 5
    device_signature_max_age_s: int = 300
    device_signature_max_skew_s: int = 60

    def __post_init__(self) -> None:
        if self.devices_per_person < 1:
            raise ValueError("devices_per_person must be at least 1")
        if self.device_signature_max_age_s < 1 or self.device_signature_max_skew_s < 0:
            raise ValueError("device_signature_max_age_s >= 1, device_signature_max_skew_s >= 0")
        if self.max_receivers_per_giver is not None and self.max_receivers_per_giver < 1:
            raise ValueError("max_receivers_per_giver must be at least 1 or unset")
        if not 0 < self.grant_max_fen <= 10**12:
            raise ValueError("grant_max_fen must be positive")
        for hour in (
            self.grant_blackout_start_hour,
            self.grant_blackout_end_hour,
            self.grant_expiry_hour,
        ):
            if not 0 <= hour <= 23:
                raise ValueError("hours are 0..23")
