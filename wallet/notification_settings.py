"""How a node delivers notifications: the push gateway and the event streams' bounds.

Built by the composition root from the node's settings (`nodes.settings`); the defaults are
a development node's (pushes go to the log).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class NotificationSettings(msgspec.Struct, frozen=True, kw_only=True):
    # "log" (development: each push is a log line), "webhook" (the province's push vendor,
    # HMAC-signed bodies) or "none" (rows stay in the list and the stream only).
    push_sender: Literal["log", "webhook", "none"] = "log"
    push_webhook_url: str | None = None
    # The HMAC-SHA256 key shared with the push vendor (raw bytes of the file).
    push_hmac_key: bytes | None = None
    push_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    # Attempts before a push is given up (`push_state = 'failed'`, counted in /metrics).
    push_attempts_max: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    push_backoff_s_min: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    push_backoff_s_max: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    push_batch_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50
    # Open event streams allowed per app session (per node process).
    sse_streams_per_session: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # A comment line this often on a quiet stream, so proxies keep it open and the app
    # notices a dead connection.
    sse_heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0
    # Notifications older than this are deleted (once pushed or given up): the list and a
    # resumed stream reach back this far.
    notification_retention_days: Annotated[int, msgspec.Meta(ge=1, le=36_500)] = 400
