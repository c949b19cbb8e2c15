"""The composition root: `create_app(settings)` wires settings, database, clock and API.

Nothing happens at import time; the database is opened (and migrated) in the lifespan.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin

from nodes.db import open_pool
from nodes.settings import Settings
from nodes.workers import WorkerSet
from wallet.api import routes
from wallet.api.guards import input_guard_middleware
from wallet.api.openapi import ContractJsonPlugin
from wallet.api.problems import EXCEPTION_HANDLERS, request_id_middleware
from wallet.api.system import metrics_middleware
from wallet.clock import Clock, SystemClock
from wallet.context import OtpSender, WalletContext
from wallet.credentials import Pepper, load_pepper
from wallet.otp import LogOtpSender, NoOtpSender
from wallet.plt.node import KeysNotFound, PltNode

log = structlog.get_logger("nodes.app")

MAX_BODY_BYTES = 4 * 1024 * 1024


@asynccontextmanager
async def open_context(
    settings: Settings,
    *,
    clock: Clock | None = None,
    otp_sender: OtpSender | None = None,
    scrypt_n: int | None = None,
    plt: PltNode | None = None,
    password_pepper: Pepper | None = None,
) -> AsyncIterator[WalletContext]:
    """Open the database (starting and migrating it if needed) and build the wallet context.

    Used by the app's lifespan and by CLI commands that act on the node's books directly.
    `plt` (tests, the local network) or else the keys and directory named by the settings
    give the node its PLT/1 identity; a node without keys runs in-province only.
    """
    plt = plt if plt is not None else load_plt(settings)
    async with open_pool(settings) as pool:
        ctx = WalletContext(
            province_code=settings.province_code,
            node_id=settings.node_id,
            pool=pool,
            otp_sender=otp_sender
            or (LogOtpSender() if settings.otp_sender == "log" else NoOtpSender()),
            rules=settings.rules,
            clock=clock or system_clock(settings),
            notifications=settings.notification_settings(),
        )
        if scrypt_n is not None:
            ctx.scrypt_n = scrypt_n
        ctx.password_pepper = password_pepper or load_password_pepper(settings)
        ctx.plt = plt
        try:
            yield ctx
        finally:
            if plt is not None:
                await plt.aclose()


def load_password_pepper(settings: Settings) -> Pepper | None:
    """The node's payment-password pepper file, if it has one (else hashes are unpeppered)."""
    pepper = load_pepper(settings.password_pepper_path)
    if pepper is None:
        log.warning(
            "password_pepper_missing",
            path=str(settings.password_pepper_path),
            hint="run `plt-node keys init` or `plt-node keys pepper`",
        )
    return pepper


def system_clock(settings: Settings) -> SystemClock:
    """The machine's clock, shifted by `clock_offset_s` (drills and tests; logged loudly)."""
    if settings.clock_offset_s:
        log.warning("clock_offset", offset_s=settings.clock_offset_s)
    return SystemClock(dt.timedelta(seconds=settings.clock_offset_s))


def load_plt(settings: Settings) -> PltNode | None:
    """This node's PLT/1 identity from its keys and directory folders, if it has keys."""
    try:
        node = PltNode.from_files(settings.plt_keys_dir, settings.plt_directory_dir)
    except KeysNotFound:
        log.warning("plt_disabled", reason="no node keys", keys_dir=str(settings.plt_keys_dir))
        return None
    if node.node_id != settings.node_id:
        raise RuntimeError(
            f"the keys in {settings.plt_keys_dir} are for {node.node_id}, "
            f"this node is {settings.node_id}"
        )
    return node


def app_from_environment() -> Litestar:
    """The app of one `plt-node serve` worker process: settings from the environment (the
    parent passed the database URL and the settings file there), logging configured here
    because a spawned process starts afresh."""
    from nodes.logging import configure_logging
    from nodes.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    otp_sender: OtpSender | None = None,
    scrypt_n: int | None = None,
    plt: PltNode | None = None,
    password_pepper: Pepper | None = None,
) -> Litestar:
    """Build one province node's ASGI app. Tests pass their own clock and OTP sender, and
    may pass the node's PLT/1 identity (`plt`) instead of keys on disk."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_context(
            settings,
            clock=clock,
            otp_sender=otp_sender,
            scrypt_n=scrypt_n,
            plt=plt,
            password_pepper=password_pepper,
        ) as ctx:
            app.state.ctx = ctx
            workers = WorkerSet(ctx)
            if settings.workers_enabled:
                workers.start()
            try:
                yield
            finally:
                await workers.stop()

    app = Litestar(
        route_handlers=routes.ROUTE_HANDLERS,
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[request_id_middleware, metrics_middleware, input_guard_middleware],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title=f"Province wallet node {settings.node_id} ({settings.province_code})",
            version="1",
            description="Wallets, relationships, settlements and PLT/1 for one province.",
            path="/schema",
            use_handler_docstrings=True,
            # The JSON document is finished by wallet.api.openapi (problems, security, PLT/1).
            render_plugins=[ContractJsonPlugin(), ScalarRenderPlugin(path="/")],
        ),
        debug=False,
    )
    app.state.operator_token = settings.operator_token
    app.state.metrics_token = settings.metrics_token
    return app
