"""An app's live event stream in network tests: real HTTP to a node, parsed as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from tests.network.support import Holder


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]


class EventStream:
    """`GET /app/v1/events` held open; `next()` is the next event (comments skipped)."""

    def __init__(self, who: Holder, last_event_id: int | None = None) -> None:
        headers = dict(who.headers)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self._http = httpx.AsyncClient(base_url=who.node.url, timeout=httpx.Timeout(30, read=None))
        self._request = self._http.build_request("GET", "/app/v1/events", headers=headers)
        self._lines: AsyncIterator[str] | None = None
        self.response: httpx.Response | None = None

    async def __aenter__(self) -> EventStream:
        self.response = await self._http.send(self._request, stream=True)
        if self.response.status_code == 200:
            self._lines = self.response.aiter_lines()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.response is not None:
            await self.response.aclose()
        await self._http.aclose()

    async def next(self, timeout_s: float = 10.0) -> Event:
        return await asyncio.wait_for(self._next(), timeout=timeout_s)

    async def take(self, count: int, timeout_s: float = 10.0) -> list[Event]:
        return [await self.next(timeout_s) for _ in range(count)]

    async def _next(self) -> Event:
        assert self._lines is not None, "the stream did not open"
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if "data" in fields:
                    event_id = int(fields.get("id", "0"))  # an `error` event has none
                    return Event(event_id, fields["event"], json.loads(fields["data"]))
                fields = {}
                continue
            if line.startswith(":"):
                continue  # a heartbeat or the opening comment
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise EOFError("the stream ended")
