"""Province nodes on loopback ports, each with its own database, talking real HTTP.

Every test gets a fresh two-province network (Hebei prov-13 and Shanghai prov-31): new
databases copied from the migrated template, new keys, and one shared ManualClock. Workers
are off: tests deliver outboxes explicitly (`network.run_senders()`), so every step is
deterministic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nodes.network import DEFAULT_PROVINCES, LocalNetwork
from tests.conftest import START, TEMPLATE_DB, TEST_SCRYPT_N
from tests.support import OPERATOR_TOKEN
from wallet.clock import ManualClock


@pytest.fixture
def net_clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def network(
    admin_dsn: str, template_dsn: str, net_clock: ManualClock
) -> AsyncIterator[LocalNetwork]:
    """prov-13 (130000) and prov-31 (310000), started, directories wired, workers off."""
    async with LocalNetwork(
        provinces=DEFAULT_PROVINCES[:2],
        admin_dsn=admin_dsn,
        template=TEMPLATE_DB,
        clock=net_clock,
        scrypt_n=TEST_SCRYPT_N,
        operator_token=OPERATOR_TOKEN,
    ) as net:
        yield net
