"""`clock_offset_s`: a drill setting that shifts one node's clock (container deadline tests)."""

from __future__ import annotations

import datetime as dt

from nodes.app import system_clock
from nodes.settings import load_settings


def test_the_offset_comes_from_the_environment_and_shifts_the_clock() -> None:
    settings = load_settings(environ={"PLT_CLOCK_OFFSET_S": "3600.5"})
    assert settings.clock_offset_s == 3600.5

    before = dt.datetime.now(dt.UTC)
    shifted = system_clock(settings).now()
    after = dt.datetime.now(dt.UTC)

    offset = dt.timedelta(seconds=3600.5)
    assert before + offset <= shifted <= after + offset


def test_without_the_setting_the_clock_is_the_machine_clock() -> None:
    settings = load_settings(environ={})
    assert settings.clock_offset_s == 0.0
    before = dt.datetime.now(dt.UTC)
    now = system_clock(settings).now()
    assert before <= now <= dt.datetime.now(dt.UTC)
