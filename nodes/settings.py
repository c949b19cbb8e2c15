"""Typed node settings, read once from a TOML file and the environment.

Every `[cfg]` rule of docs/rules.md is a field of `ProvinceRules`, never a constant in code.
Precedence: defaults < the TOML file named by `PLT_CONFIG` (or passed in) < environment
variables `PLT_<FIELD>` (top-level fields) and `PLT_RULES__<FIELD>` (province rules), plus
the conventional `DATABASE_URL`. Tests build `Settings(...)` directly.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from wallet.credentials import PEPPER_FILE
from wallet.notification_settings import NotificationSettings
from wallet.rules import ProvinceRules

__all__ = ["ProvinceRules", "Settings", "SettingsError", "load_settings"]


class SettingsError(ValueError):
    """A settings file or environment variable is missing, unknown or of the wrong type."""


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything one province node needs to run."""

    province_code: str = "130000"
    node_id: str = "prov-13"
    # PostgreSQL: a server of our own from the embedded wheel unless a URL is given.
    database_url: str | None = None
    data_dir: str = "data"
    db_pool_min: int = 2
    db_pool_max: int = 10
    # How long opening a database connection may take. asyncpg's default (60 s) outlasts
    # every client: with the server's host gone (killed, partitioned) a request that needs a
    # fresh connection would hang instead of answering 503 and "retry".
    db_connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    # Which server of a multi-host `DATABASE_URL` (`postgresql://u:p@pg-a:5432,pg-b:5432/db`)
    # a connection may use; hosts are tried in order. "read-write" (the default) finds the
    # primary, and after a failover the promoted standby: a ledger is never written through
    # a standby. "any" takes the first host that answers (one-host URLs need nothing else).
    db_target_session_attrs: Literal["read-write", "primary", "any"] = "read-write"
    host: str = "127.0.0.1"
    port: int = 8013
    # HTTP worker processes of `plt-node serve` (one event loop each, sharing the port). The
    # parent starts the embedded PostgreSQL and migrates once; each worker has its own pool
    # of up to db_pool_max connections and runs the background workers, which coordinate
    # through PostgreSQL only (SKIP LOCKED, leases, row locks), as replicas do.
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # Operators authenticate with this bearer token on /operator/v1 (empty disables the API).
    operator_token: str = ""
    # Bearer token for /metrics only (so Prometheus never holds the operator token); the
    # operator token is accepted too. Empty: only the operator token may scrape.
    metrics_token: str = ""
    # Where one-time passwords go: "log" (development: the code is logged) or "none".
    otp_sender: Literal["log", "none"] = "log"
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"
    rules: ProvinceRules = msgspec.field(default_factory=ProvinceRules)
    # PLT/1: this node's keys (`plt-node keys init`) and its peer directory (peers.json,
    # keysets/, regions.json); by default under data_dir/<node_id>/. Without keys the node
    # runs in-province only.
    keys_dir: str | None = None
    directory_dir: str | None = None
    # The base URL peers reach this node at (printed by `plt-node keys show`).
    public_url: str | None = None
    # Background workers (outbox sender, key set refresh, grant sweeper and resolver).
    # Tests that drive the sender themselves (`transport.run_once`) turn them off.
    workers_enabled: bool = True
    # Shifts this node's clock by this many seconds (drills and container tests only: stand
    # a node just before its grant deadline). Production nodes leave it at 0.
    clock_offset_s: float = 0.0
    # Notifications (docs/notifications.md): the push gateway ("log" for development,
    # "webhook" to the province's push vendor with HMAC-signed bodies, "none"), its retry
    # bounds, and the app event streams' bounds.
    push_sender: Literal["log", "webhook", "none"] = "log"
    push_webhook_url: str | None = None
    push_hmac_key_file: str | None = None
    push_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    push_attempts_max: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    push_backoff_s_min: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    push_backoff_s_max: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    sse_streams_per_session: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    sse_heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0
    notification_retention_days: Annotated[int, msgspec.Meta(ge=1, le=36_500)] = 400

    @property
    def embedded_data_dir(self) -> Path:
        return Path(self.data_dir) / self.node_id / "postgres"

    @property
    def plt_keys_dir(self) -> Path:
        return Path(self.keys_dir) if self.keys_dir else Path(self.data_dir) / self.node_id / "keys"

    @property
    def password_pepper_path(self) -> Path:
        """The payment-password pepper, beside the PLT/1 keys (`plt-node keys init` makes it)."""
        return self.plt_keys_dir / PEPPER_FILE

    @property
    def plt_directory_dir(self) -> Path:
        if self.directory_dir:
            return Path(self.directory_dir)
        return Path(self.data_dir) / self.node_id / "directory"

    @property
    def plt_public_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    def notification_settings(self) -> NotificationSettings:
        """The push gateway and stream bounds for the wallet, with the HMAC key file read
        (a webhook without its URL or key is refused at start, not at the first push)."""
        key: bytes | None = None
        if self.push_hmac_key_file:
            try:
                key = Path(self.push_hmac_key_file).read_bytes().strip()
            except OSError as exc:
                raise SettingsError(f"cannot read push_hmac_key_file: {exc}") from exc
        if self.push_sender == "webhook" and not (self.push_webhook_url and key):
            raise SettingsError(
                "push_sender = webhook needs push_webhook_url and push_hmac_key_file"
            )
        return NotificationSettings(
            push_sender=self.push_sender,
            push_webhook_url=self.push_webhook_url,
            push_hmac_key=key,
            push_timeout_s=self.push_timeout_s,
            push_attempts_max=self.push_attempts_max,
            push_backoff_s_min=self.push_backoff_s_min,
            push_backoff_s_max=self.push_backoff_s_max,
            sse_streams_per_session=self.sse_streams_per_session,
            sse_heartbeat_s=self.sse_heartbeat_s,
            notification_retention_days=self.notification_retention_days,
        )


def _coerce_env(raw: Mapping[str, str], fields: set[str], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :].lower()
        if name.startswith("rules__"):
            continue
        if name not in fields:
            raise SettingsError(f"unknown setting {key}")
        out[name] = value
    return out


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read settings from a TOML file (optional) and the environment."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    path = path or env.get("PLT_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
    top_fields = set(Settings.__struct_fields__) - {"rules"}
    data.update(_coerce_env(env, top_fields, "PLT_"))
    rules = dict(data.get("rules", {}))
    for key, value in env.items():
        if key.startswith("PLT_RULES__"):
            rules[key[len("PLT_RULES__") :].lower()] = value
    if rules:
        data["rules"] = rules
    if env.get("DATABASE_URL"):
        data["database_url"] = env["DATABASE_URL"]
    try:
        # strict=False lets "8013" from the environment become an int, "true" a bool.
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid settings: {exc}") from exc
