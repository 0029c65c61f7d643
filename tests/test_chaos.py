"""The chaos suite, small and seeded (test settings: lease 3 s); `make chaos` runs the full
one at the shipped defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import KINDS, Chaos

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_a_seeded_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    chaos = Chaos(seed=7, trees=4, workers=2, faults=4, fast=True, work=tmp_path)
    try:
        report = chaos.run()
    finally:
        chaos.stop_all()
    assert report.violations == []
    assert len(report.faults) == 4
    assert {f.kind for f in report.faults} <= set(KINDS)
    assert all(f.recovered is not None for f in report.faults), report.faults
    assert report.trees >= 4
    assert report.nodes >= 13 * report.trees
    assert report.failed_calls > 0  # the model really failed, and was retried
