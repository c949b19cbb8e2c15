"""Every controller of the node, in one list for `create_app`."""

from __future__ import annotations

from typing import Any

from wallet.api.system import SystemController

ROUTE_HANDLERS: list[Any] = [
    SystemController,
]
