"""The README's main command: `plt-node demo` walks a node from roster to refund."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_command_walks_from_roster_to_refund_with_balanced_books() -> None:
    data_dir = ROOT / "data" / f"test-demo-{os.getpid()}"
    env = {**os.environ, "PLT_DATA_DIR": str(data_dir), "COLUMNS": "120"}
    env.pop("DATABASE_URL", None)  # the demo runs on its own embedded PostgreSQL
    try:
        result = subprocess.run(
            [sys.executable, "-m", "nodes", "demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "balanced, every fen accounted for" in result.stdout
    assert "¥431.50" in result.stdout  # 500.00 - 88.50 + 20.00
