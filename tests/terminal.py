"""A real pseudo-terminal running the CLI: ^C goes through the line discipline as SIGINT to the
terminal's foreground process group, exactly as when a person presses Ctrl-C."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

from tests.helpers import ROOT


def embedded_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI on the embedded default: no TASKTREE_REDIS_URL."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TASKTREE_") or k == "TASKTREE_ENV_FILE"
    }
    env.update({"TASKTREE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra})
    return env


def _controlling_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`python -m tasktree ARGS` on a pseudo-terminal of its own (120 columns)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.fd, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasktree", *args],
            cwd=ROOT,
            env={**env, "COLUMNS": "120", "TERM": "xterm"},
            stdin=child,
            stdout=child,
            stderr=child,
            preexec_fn=_controlling_terminal,
        )
        os.close(child)
        self.buf = b""

    def _read(self, wait: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if ready:
            try:
                self.buf += os.read(self.fd, 65536)
            except OSError:  # the other side closed
                time.sleep(wait)

    def read_until(self, needle: bytes, timeout: float = 60) -> None:
        start = len(self.buf)
        deadline = time.monotonic() + timeout
        while needle not in self.buf[start:] and time.monotonic() < deadline:
            self._read(0.1)
        assert needle in self.buf[start:], self.buf[-3000:].decode(errors="replace")

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float) -> int:
        """The exit status, reading output meanwhile; fails if the process outlives `timeout`."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.05)
        self._read(0.05)
        assert self.proc.poll() is not None, "still running: " + self.text[-2000:]
        return self.proc.returncode

    @property
    def text(self) -> str:
        return self.buf.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def cli(env: dict[str, str], *args: str, input: str | None = None, timeout: float = 90) -> Any:
    """Run the CLI to its end (no terminal); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "tasktree", *args],
        cwd=ROOT,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(env: dict[str, str], *args: str) -> Any:
    out = cli(env, *args, "--json")
    assert out.returncode in (0, 1, 130), out.stderr
    return json.loads(out.stdout)


def stop_embedded(data_dir: Path) -> None:
    """Shut down an embedded Redis a test left behind (a killed CLI leaves it running)."""
    import redis

    port_file = data_dir / "redis.port"
    if port_file.exists():
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=int(port_file.read_text()), socket_timeout=2).shutdown(nosave=True)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
