"""What every wallet operation needs from the running node, built by `nodes.app`.

`wallet/` never imports `nodes/`: the composition root hands it this context instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from wallet.clock import Clock, SystemClock
from wallet.credentials import DEFAULT_SCRYPT_N, Pepper
from wallet.notification_settings import NotificationSettings
from wallet.plt.node import PltNode  # a real import: Litestar resolves these hints at runtime
from wallet.rules import ProvinceRules


class OtpSender(Protocol):
    async def send(self, phone: str, code: str, purpose: str) -> None:
        """Deliver a one-time password to the phone on the roster."""
        ...


@dataclass
class WalletContext:
    province_code: str
    node_id: str
    pool: asyncpg.Pool
    otp_sender: OtpSender
    rules: ProvinceRules = field(default_factory=ProvinceRules)
    clock: Clock = field(default_factory=SystemClock)
    # scrypt work factor for new payment passwords (stored with each hash).
    scrypt_n: int = DEFAULT_SCRYPT_N
    # The node's password pepper (a key file beside the PLT/1 keys, `wallet.credentials`);
    # None on a node without one: new hashes are then unpeppered (and logged at start).
    password_pepper: Pepper | None = None
    # This node on the PLT/1 network (keys, peer directory, HTTP client); None when the node
    # has no keys yet (`plt-node keys init`), and then cross-province features answer 503.
    plt: PltNode | None = None
    # Push gateway and event-stream bounds (`wallet.push`, `wallet.notification_stream`).
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
