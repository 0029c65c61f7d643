"""Test helpers: real worker processes and a scriptable OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from tasktree.models import Reply
from tasktree.store import CallRecord, Store

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A real `celery -A workers worker` subprocess, its log in a file."""

    def __init__(
        self,
        env: dict[str, str],
        name: str,
        log_dir: Path,
        args: list[str] | None = None,
        app: str = "workers",
    ):
        self.name = name
        self.log = log_dir / f"{name.split('@')[0]}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-n",
            name,
            "--loglevel",
            "INFO",
            "--without-mingle",  # no one-second wait for other workers' hellos
            "--without-gossip",
            *(args or []),
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}")
            if " ready." in self.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name}: no {text!r}:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: the crash a test wants."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


Handler = Callable[[dict[str, Any], int], tuple[int, dict[str, str], Any]]


class FakeOpenAI:
    """An OpenAI-compatible chat completions server on 127.0.0.1, scripted by a handler.

    The handler gets the request JSON and the 0-based request number and returns
    (status, headers, body): a dict body is sent as JSON; the string "DROP" closes the socket.
    The request's headers are `headers[n]`.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    n = len(outer.requests)
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                status, headers, payload = outer.handler(body, n)
                if payload == "DROP":
                    self.connection.shutdown(2)
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat(content: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> dict[str, Any]:
    """An OpenAI chat.completion response body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def is_decide(body: dict[str, Any]) -> bool:
    return str(body["messages"][0]["content"]).startswith("[tasktree:")


def is_synthesis(body: dict[str, Any]) -> bool:
    return str(body["messages"][-1]["content"]).startswith("[tasktree:synthesize]")


class RedisServer:
    """A redis-server of the test's own: its port, its data directory, its options."""

    def __init__(self, data_dir: Path, *args: str, exe: str | None = None, port: int | None = None):
        from tasktree.embedded import free_port, redis_server_path

        self.exe = exe or redis_server_path()
        self.port = port or free_port()
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_url: str | None = None, **client_kw: Any) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--logfile",
                "redis.log",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = ready_url or f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(url, **client_kw).ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError((self.dir / "redis.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            self.proc.wait(timeout=20)


class RateLimitedProvider(FakeOpenAI):
    """An OpenAI-compatible server that allows `capacity` calls at once, each taking `latency`
    seconds, and answers a 429 with Retry-After above that. Decisions split the root into
    sections and each section into parts; the rest is answered in text."""

    def __init__(self, capacity: int, latency: float, sections: int = 4, parts: int = 3):
        self.capacity, self.latency = capacity, latency
        self.in_flight = self.most_in_flight = self.refused = self.answered = 0
        self._count = threading.Lock()
        self.sections, self.parts = sections, parts
        super().__init__(self._answer)

    def _answer(self, body: dict[str, Any], n: int) -> tuple[int, dict[str, str], Any]:
        with self._count:
            if self.in_flight >= self.capacity:
                self.refused += 1
                return 429, {"Retry-After": "1"}, {"error": {"message": "too many requests"}}
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.latency)
            return 200, {}, chat(self._text(body))
        finally:
            with self._count:
                self.in_flight -= 1
                self.answered += 1

    def _text(self, body: dict[str, Any]) -> str:
        task = body["messages"][-1]["content"]
        if not is_decide(body):
            return f"answer to {task[-30:]}"
        if "Part " in task:
            return json.dumps({"decision": "execute", "reason": "small", "sub_tasks": []})
        kind, n = ("Part", self.parts) if "Section " in task else ("Section", self.sections)
        subs = [
            {"requested_persona": f"You are {kind} {i}.", "task_details": f"{kind} {i}."}
            for i in range(1, n + 1)
        ]
        return json.dumps({"decision": "delegate", "reason": "split", "sub_tasks": subs})


class Flower:
    """A real Flower process (`celery -A workers flower`) on 127.0.0.1, its API unauthenticated."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        from tasktree.embedded import free_port

        self.base = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers",
                "flower",
                f"--port={self.base.rsplit(':', 1)[1]}",
                "--address=127.0.0.1",
                "--inspect_timeout=300",  # ms: a test's workers answer at once
            ],
            cwd=ROOT,
            env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=(log_dir / "flower.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(self.base + path, timeout=5) as resp:
            return json.loads(resp.read())

    def __enter__(self) -> Self:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/api/workers?refresh=1")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise
                time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


def record_call(
    store: Store,
    tree_id: str,
    node_id: str,
    step: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cost_usd: float,
    cost_known: bool,
    latency: float,
    *,
    token: str = "",
    call_id: str = "",
    text: str = "",
) -> int:
    """Record a model call's usage as a run does (Store.record); returns its code."""
    usage = (prompt_tokens, completion_tokens, cost_usd, cost_known, latency)
    return store.record(
        tree_id, node_id, CallRecord(step, Reply(text, model, *usage), token, call_id)
    )
