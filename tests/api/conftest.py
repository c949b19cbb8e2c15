"""The API contract tests use the single node of tests/conftest.py (`client`) and the
two-province network of tests/network/conftest.py (`network`)."""

from tests.network.conftest import net_clock, network

__all__ = ["net_clock", "network"]
