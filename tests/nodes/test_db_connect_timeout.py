"""A database host that never answers makes a connection attempt fail within the node's
connect timeout (then the request answers 503 and "retry"), not after asyncpg's 60 s."""

from __future__ import annotations

import asyncio
import socket
import time

import asyncpg
import pytest

from nodes.settings import load_settings
from wallet.api.problems import _database_unavailable


def test_the_connect_timeout_defaults_to_five_seconds() -> None:
    assert load_settings(environ={}).db_connect_timeout_s == 5.0


async def test_a_silent_database_host_fails_the_connection_within_the_timeout() -> None:
    # A TCP listener that accepts and never speaks: like a server whose host is gone, the
    # attempt gets no refusal, only silence.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as raised:
            await asyncpg.connect(f"postgresql://plt@127.0.0.1:{port}/plt", timeout=0.5)
        assert time.monotonic() - started < 5
        assert _database_unavailable(raised.value)  # answered as 503, not 500
    finally:
        silent.close()
        await asyncio.sleep(0)
