"""The benchmark in miniature (seconds), so that it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_bench_quick_runs_and_reports(redis_url, r, tmp_path) -> None:
    out = tmp_path / "BENCH.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "TASKTREE_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "## 1. Overhead per node" in text
    assert "## 2–3. Wall time / critical path" in text
    rows = [line for line in text.splitlines() if line.startswith("| depth 1, fan-out 3")]
    assert len(rows) == 3
    assert all("—" not in row.split("|")[3] for row in rows)
