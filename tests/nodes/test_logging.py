"""Logs are JSON, and ID numbers, names and phone numbers never appear whole in them."""

from __future__ import annotations

import io
import json

import structlog

from nodes.logging import configure_logging


def test_personal_data_is_masked_in_json_logs() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    structlog.get_logger("t").info(
        "roster_row_refused",
        id_number="11010519491231002X",
        name="张三丰",
        phone="13800138000",
        note="person 11010519491231002X was refused",
    )
    structlog.reset_defaults()  # the stream is ours; later tests log to their own
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "roster_row_refused"
    assert line["id_number"] == "1101**********002X"
    assert line["name"] == "张**"
    assert line["phone"] == "138****8000"
    assert line["note"] == "person 1101**********002X was refused"
    assert "11010519491231002X" not in json.dumps(line, ensure_ascii=False)
