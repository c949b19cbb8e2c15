"""App surface for notifications: the list, marking read, and the live event stream.

Every route is the caller's own: there is no person in any path or parameter, so nobody can
ask for another person's notifications, and marking someone else's as read is `not_found`.
The kinds, fields and the stream's protocol are in docs/notifications.md.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, QueryParameter
from litestar.response import ServerSentEvent

from wallet import notification_stream, notifications
from wallet.api.auth import AppCaller, provide_app_caller, provide_ctx
from wallet.api.body import StrictBody
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.notifications import MarkedRead, NotificationPage

NotificationId = Annotated[int, msgspec.Meta(ge=1, le=notifications.ID_MAX)]


class MarkRead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which notifications to mark read: these `ids` (all must be mine), or every one up to
    and including `up_to` (the newest the app showed). Exactly one of the two."""

    ids: Annotated[list[NotificationId], msgspec.Meta(max_length=notifications.PAGE_MAX)] = []
    up_to: NotificationId | None = None


class AppNotificationsController(Controller):
    path = "/app/v1"
    tags = ["app: notifications"]
    dependencies = {"caller": Provide(provide_app_caller), "ctx": Provide(provide_ctx)}

    @get("/notifications", operation_id="app_list_notifications")
    async def list_notifications(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        before: Annotated[NotificationId | None, QueryParameter()] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=notifications.PAGE_MAX)] = 20,
        unread: Annotated[bool, QueryParameter()] = False,
    ) -> NotificationPage:
        """My notifications, newest first, with the unread count. Page with `before` (the
        `next_before` of the previous page); `unread=true` lists only unread ones."""
        return await notifications.page(
            ctx.pool, caller.person_id, before=before, limit=limit, unread_only=unread
        )

    @post(
        "/notifications/read",
        operation_id="app_mark_notifications_read",
        status_code=200,
        dto=StrictBody[MarkRead],
        return_dto=None,
    )
    async def mark_read(
        self,
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
        data: JSONBody[MarkRead],
    ) -> MarkedRead:
        """Mark notifications read (`ids`, or all up to `up_to`); answers how many changed
        and the unread count left. An id that is not mine: 404, and nothing is marked."""
        if bool(data.ids) == (data.up_to is not None):
            raise WalletError(ErrorCode.INVALID_REQUEST, "send either `ids` or `up_to`")
        return await notifications.mark_read(
            ctx.pool, caller.person_id, ctx.clock.now(), ids=data.ids, up_to=data.up_to
        )

    @get("/events", operation_id="app_event_stream", media_type="text/event-stream")
    async def events(
        self,
        request: Request[Any, Any, Any],
        ctx: NamedDependency[WalletContext],
        caller: NamedDependency[AppCaller],
    ) -> ServerSentEvent:
        """My notifications as they happen (Server-Sent Events, `text/event-stream`).

        Each event's `id` is the notification id and `event` its kind. Without
        `Last-Event-ID` the stream starts with the next new notification; with it (the id of
        the newest notification the app holds, from the list or the stream; `0` for all),
        every one after it comes first (a bad one: 400). Comment lines are heartbeats. At
        most `sse_streams_per_session` streams per session (429).
        """
        cursor = notification_stream.parse_last_event_id(request.headers.get("last-event-id"))
        if cursor is None:  # live from now: the list has the history
            cursor = await notifications.newest_of(ctx.pool, caller.person_id)
        elif cursor > await notifications.newest_id(ctx.pool):
            raise WalletError(
                ErrorCode.INVALID_REQUEST, "Last-Event-ID names an event this node never sent"
            )
        notification_stream.hub_of(ctx).check_capacity(caller.token_hash)
        return ServerSentEvent(
            notification_stream.events(ctx, caller.person_id, caller.token_hash, cursor),
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
