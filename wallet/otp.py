"""Delivery of one-time passwords. Real SMS gateways plug in behind `OtpSender`."""

from __future__ import annotations

import structlog

log = structlog.get_logger("wallet.otp")


class LogOtpSender:
    """Development sender: writes the code to the log (the phone number masked)."""

    async def send(self, phone: str, code: str, purpose: str) -> None:
        log.info("otp_sent", phone=phone, otp_code=code, purpose=purpose)


class RecordingOtpSender:
    """Keeps the last code per phone, for scripted walks and tests that read their own SMS."""

    def __init__(self) -> None:
        self.last: dict[str, str] = {}

    async def send(self, phone: str, code: str, purpose: str) -> None:
        self.last[phone] = code


class NoOtpSender:
    async def send(self, phone: str, code: str, purpose: str) -> None:
        return None
