"""Structured JSON logs in which ID numbers, names and phone numbers are always masked."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from wallet.privacy import mask_id_number, mask_name, mask_phone, scrub_text

_MASKERS = {
    "id_number": mask_id_number,
    "receiver_id_number": mask_id_number,
    "giver_id_number": mask_id_number,
    "name": mask_name,
    "receiver_name": mask_name,
    "giver_name": mask_name,
    "phone": mask_phone,
}


def mask_personal_data(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask known personal fields and ID-shaped text anywhere."""
    for key, value in list(event.items()):
        if isinstance(value, str):
            masker = _MASKERS.get(key)
            event[key] = masker(value) if masker else scrub_text(value)
    return event


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog; logs go to `stream` (standard error by default)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_personal_data,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
