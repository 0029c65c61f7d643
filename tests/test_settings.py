"""Settings from the environment and `.env`: what a user's file does, and what it must not do
to the test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasktree.errors import ConfigError
from tasktree.settings import OFFLINE_MODEL, load
from tests.helpers import ROOT


def test_dot_env_example_as_a_users_dot_env_reads_cleanly(tmp_path: Path, monkeypatch) -> None:
    """`cp .env.example .env` (DEPLOY.md): its empty entries mean "unset", not "empty"."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKTREE_ENV_FILE")
    settings = load()
    assert settings.model_for("execute") == OFFLINE_MODEL
    assert settings.api_key is None
    assert settings.api_base is None
    assert settings.concurrency == 32


def test_the_environment_wins_over_dot_env(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".env").write_text("TASKTREE_MAX_DEPTH=1\nTASKTREE_MAX_NODES=7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKTREE_ENV_FILE")
    monkeypatch.setenv("TASKTREE_MAX_DEPTH", "2")
    settings = load()
    assert settings.max_depth == 2
    assert settings.max_nodes == 7


def test_the_tests_never_read_a_dot_env(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".env").write_text("TASKTREE_MAX_DEPTH=0\n")
    monkeypatch.chdir(tmp_path)
    assert load().max_depth == 3


def test_a_bad_value_in_dot_env_is_one_line(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".env").write_text("TASKTREE_CONCURRENCY=lots\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKTREE_ENV_FILE")
    with pytest.raises(ConfigError, match="TASKTREE_CONCURRENCY"):
        load()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TASKTREE_EVENTS_MAXLEN", "99999999999999999999"),
        ("TASKTREE_STEP_LEASE", "1e300"),
        ("TASKTREE_TREE_TTL", "-1"),
        ("TASKTREE_LLM_CONCURRENCY", "99999999999999999999"),
        ("TASKTREE_LLM_LIMITS", "openai/*=99999999999999999999rpm"),
        ("TASKTREE_MEMORY_GUARD", "1.5"),
    ],
)
def test_numbers_that_reach_redis_are_bounded_in_one_line(name: str, value: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tasktree", "list"],
        env={**os.environ, name: value, "TASKTREE_REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert name in out.stderr
