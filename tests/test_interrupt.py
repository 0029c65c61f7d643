"""Ctrl-C while `submit` waits on real workers, on a real pseudo-terminal: cancel, or detach."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tasktree.store import Store
from tests.helpers import ROOT


def read_until(fd: int, needle: bytes, timeout: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                break
    assert needle in buf, buf[-2000:]
    return buf


@pytest.mark.parametrize(
    ("answer", "status", "code"), [("c", "cancelled", 1), ("k", "running", 130)]
)
def test_ctrl_c_asks_to_cancel_or_detach(
    env, settings_for, start_workers, answer, status, code
) -> None:
    start_workers(
        1,
        extra_env={
            "TASKTREE_OFFLINE_FANOUT": "3",
            "TASKTREE_OFFLINE_LATENCY": "0.5",
            "TASKTREE_CONCURRENCY": "2",
        },
    )
    controller, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasktree", "submit", "Slow work.", "--max-depth", "3"],
        cwd=ROOT,
        env={**os.environ, **env, "COLUMNS": "120"},
        stdin=child,
        stdout=child,
        stderr=child,
        start_new_session=True,
        preexec_fn=None,
    )
    os.close(child)
    try:
        read_until(controller, b"deciding")
        time.sleep(1.0)
        os.killpg(proc.pid, 2)  # what the terminal sends on Ctrl-C
        read_until(controller, b"Stop tree")
        os.write(controller, answer.encode() + b"\n")
        assert proc.wait(timeout=90) == code
        store = Store.from_settings(settings_for())
        tree, _ = store.list_trees(1)[0]
        assert tree.status == status
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)


def test_a_command_cut_off_by_ctrl_c_leaves_no_reply_for_the_next(env, settings_for) -> None:
    """The state a KeyboardInterrupt between a command and its reply leaves: the command sent,
    its connection back in the pool, its reply still to come. Without `after_interrupt` the
    next command on that connection reads the old reply (here XREAD's nil, 0.2 s later)."""
    from tasktree.client import Client

    with Client(settings_for(), worker=False) as client:
        pool = client.store.r.connection_pool
        conn = pool.get_connection()
        conn.send_command("XREAD", "BLOCK", "200", "STREAMS", "tasktree:test:none", "$")
        pool.release(conn)
        client.after_interrupt()
        assert client.store.r.lrange("tasktree:test:none:list", 0, -1) == []
        assert client.store.r.ping() is True
