"""The live event stream of an app (Server-Sent Events), woken by PostgreSQL NOTIFY.

Each stream reads its person's rows after its cursor from the table (`notifications.after`)
and sends them as SSE events whose `id` is the row id, so a reconnect with `Last-Event-ID`
resumes exactly after the last event the app received. Between reads it waits on a wake-up:
one LISTEN connection per node process (`Hub`) fans `pg_notify` out to the streams of the
person named in the payload, on every replica. Correctness never depends on the wake-up:
a stream also reads again at each heartbeat, and when the LISTEN connection is re-opened
every stream is woken.

Writers that wake the streams after their commit rather than with `pg_notify` inside it
(`announce`, the settlements) wake this process's streams at once and send the other
processes one NOTIFY per batch, gathered for ANNOUNCE_GATHER_S: a NOTIFY is a transaction
with a commit of its own (a WAL flush, under PostgreSQL's database-wide NOTIFY lock), so a
busy node sends a few per second rather than one per payment, and no payment waits for one.

The LISTEN connection is held only while at least one stream is open. Streams per session
are bounded in this process (`sse_streams_per_session`), and a stream ends (an `error` event,
`unauthorized`) at the first heartbeat after its session was logged out or expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable

import asyncpg
import msgspec
import structlog
from litestar.response import ServerSentEventMessage

from wallet import notifications
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError

log = structlog.get_logger("wallet.notification_stream")

READ_BATCH = 100
# A stream outlives no session: checked at each heartbeat (logout, expiry, a closed wallet).
_SESSION_LIVE = """
SELECT true FROM app_session s JOIN wallet w ON w.person_id = s.person_id
WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > $2 AND w.state = 'open'
"""
_ANNOUNCE = "SELECT pg_notify($1, p::text) FROM unnest($2::bigint[]) AS p"
# How long announcements gather before one NOTIFY carries them: the delay a stream on
# another process (a replica, a worker) may see, against one commit per payment.
ANNOUNCE_GATHER_S = 0.05
RECONNECT_PAUSE_S = 1.0
ALIVE_CHECK_S = 5.0
# Tells EventSource clients how long to wait before reconnecting (milliseconds).
RETRY_MS = 2000


class Hub:
    """The wake-ups of one node process: person id -> the events of their open streams."""

    def __init__(self, ctx: WalletContext) -> None:
        self._ctx = ctx
        self._waiters: dict[int, set[asyncio.Event]] = defaultdict(set)
        self._per_session: dict[bytes, int] = defaultdict(int)
        self._listener: asyncio.Task[None] | None = None
        self._to_announce: set[int] = set()
        self._announcer: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        return sum(self._per_session.values())

    def check_capacity(self, session: bytes) -> None:
        """Refuse (429 `stream_limit_reached`) a session at its `sse_streams_per_session`."""
        limit = self._ctx.notifications.sse_streams_per_session
        if self._per_session.get(session, 0) >= limit:
            raise WalletError(
                ErrorCode.STREAM_LIMIT_REACHED,
                f"this session already has {limit} open event streams; close one first",
                limit=limit,
            )

    @contextlib.asynccontextmanager
    async def subscribe(self, person_id: int, session: bytes) -> AsyncIterator[asyncio.Event]:
        """An event set whenever a notification of `person_id` commits, for as long as the
        block runs; refused like `check_capacity` when the session is at its limit."""
        self.check_capacity(session)
        self._per_session[session] += 1
        wake = asyncio.Event()
        self._waiters[person_id].add(wake)
        self._start_listener()
        try:
            yield wake
        finally:
            self._waiters[person_id].discard(wake)
            if not self._waiters[person_id]:
                del self._waiters[person_id]
            self._per_session[session] -= 1
            if not self._per_session[session]:
                del self._per_session[session]
            if not self._waiters:
                self._stop_listener()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.isdigit():
            self._wake(int(payload))

    def _wake(self, person_id: int) -> None:
        for wake in self._waiters.get(person_id, ()):
            wake.set()

    def announce(self, person_ids: Iterable[int]) -> None:
        """Notifications of `person_ids` committed: wake their streams here now, and on every
        other process (replicas, workers) by a NOTIFY sent in the background."""
        for person_id in person_ids:
            self._wake(person_id)
            self._to_announce.add(person_id)
        if self._to_announce and (self._announcer is None or self._announcer.done()):
            self._announcer = asyncio.create_task(self._send_announcements(), name="announce")

    async def _send_announcements(self) -> None:
        """NOTIFY the persons gathered, one statement per batch, until none are left. A
        failure only loses wake-ups (streams re-read at each heartbeat): logged, not raised."""
        while self._to_announce:
            await asyncio.sleep(ANNOUNCE_GATHER_S)
            batch = sorted(self._to_announce)
            self._to_announce.clear()
            try:
                await self._ctx.pool.execute(_ANNOUNCE, notifications.CHANNEL, batch)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("notification_announce_failed", persons=len(batch), error=repr(exc))

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for wake in waiters:
                wake.set()

    def _start_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="notification-listen")

    def _stop_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def _listen(self) -> None:
        """Hold `LISTEN wallet_notification` while streams are open; re-open it if lost."""
        while True:
            try:
                async with self._ctx.pool.acquire() as conn:
                    await conn.add_listener(notifications.CHANNEL, self._notified)
                    try:
                        self._wake_all()  # rows committed while nobody listened
                        while not conn.is_closed():
                            await asyncio.sleep(ALIVE_CHECK_S)
                            await conn.execute("SELECT 1")  # raises if the connection died
                    finally:
                        if not conn.is_closed():
                            await conn.remove_listener(notifications.CHANNEL, self._notified)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("notification_listen_lost", error=repr(exc))
            await asyncio.sleep(RECONNECT_PAUSE_S)


# One hub per context (tests run several nodes in one process); the entry goes with it.
_HUBS: dict[int, Hub] = {}


def hub_of(ctx: WalletContext) -> Hub:
    hub = _HUBS.get(id(ctx))
    if hub is None:
        hub = _HUBS[id(ctx)] = Hub(ctx)
        weakref.finalize(ctx, _HUBS.pop, id(ctx), None)
    return hub


def announce(ctx: WalletContext, person_ids: Iterable[int]) -> None:
    """Call after the commit of notifications written without `pg_notify` (see `Hub.announce`)."""
    hub_of(ctx).announce(person_ids)


def parse_last_event_id(raw: str | None) -> int | None:
    """The cursor from `Last-Event-ID` (None without one); 400 for anything but a row id."""
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > notifications.ID_MAX:
        raise WalletError(
            ErrorCode.INVALID_REQUEST,
            "Last-Event-ID must be the id of an event this stream sent (a decimal number)",
        )
    return int(raw)


def _event(view: notifications.NotificationView) -> ServerSentEventMessage:
    data = msgspec.json.encode(view).decode()
    return ServerSentEventMessage(data=data, event=view.kind, id=view.id, sep="\n")


async def events(
    ctx: WalletContext, person_id: int, session: bytes, cursor: int
) -> AsyncIterator[ServerSentEventMessage]:
    """The person's events after `cursor`, then each new one as it commits, with heartbeats
    while quiet. Runs until the client goes away.

    The handler checked the session's capacity before answering 200; a stream that lost the
    race for the last place, or whose session ended, ends with an `error` event carrying the
    problem."""
    try:
        async with hub_of(ctx).subscribe(person_id, session) as wake:
            async for message in _follow(ctx, person_id, session, cursor, wake):
                yield message
    except WalletError as exc:
        yield ServerSentEventMessage(
            data=msgspec.json.encode(exc.problem()).decode(), event="error", sep="\n"
        )


async def _follow(
    ctx: WalletContext, person_id: int, session: bytes, cursor: int, wake: asyncio.Event
) -> AsyncIterator[ServerSentEventMessage]:
    heartbeat_s = ctx.notifications.sse_heartbeat_s
    loop = asyncio.get_running_loop()
    checked_at = loop.time()
    yield ServerSentEventMessage(data=None, comment="stream open", retry=RETRY_MS, sep="\n")
    while True:
        wake.clear()  # before reading: a commit during the read wakes the next wait
        batch = await notifications.after(ctx.pool, person_id, cursor, READ_BATCH)
        for view in batch:
            yield _event(view)
            cursor = view.id
        if loop.time() - checked_at >= heartbeat_s:  # a busy stream is checked as often
            await _require_session(ctx, session)
            checked_at = loop.time()
        if len(batch) == READ_BATCH:
            continue
        try:
            await asyncio.wait_for(wake.wait(), timeout=heartbeat_s)
        except TimeoutError:
            await _require_session(ctx, session)
            checked_at = loop.time()
            yield ServerSentEventMessage(data=None, comment="heartbeat", sep="\n")


async def _require_session(ctx: WalletContext, session: bytes) -> None:
    """End the stream (`unauthorized`) once its session is logged out or expired."""
    if not await ctx.pool.fetchval(_SESSION_LIVE, session, ctx.clock.now()):
        raise WalletError(ErrorCode.UNAUTHORIZED, "the session ended (logged out or expired)")
