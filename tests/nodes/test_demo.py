"""The README's main command: `plt-node demo` walks a grant between two provinces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_walks_a_grant_from_filing_to_spending_with_balanced_books() -> None:
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
            timeout=300,
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "relationship" in out and "is active on both nodes" in out
    assert "her quota: ¥300.00" in out
    assert "her phone (live event stream): grant.offered — ¥300.00 from " in out
    assert "quota" in out.split("5. She pays")[1].split("6. He ends")[0]
    assert "father's personal account: ¥411.50" in out  # 500.00 - 88.50
    assert "prov-13: balanced" in out and "prov-31: balanced" in out
    assert "balanced, every fen accounted for" in out
    # A normal start warns of nothing (the demo shows warnings only, so none at all).
    assert "[warning" not in out + result.stderr
