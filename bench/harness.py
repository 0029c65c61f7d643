"""The benchmark's harness: worker processes, tasktree clients, and the bare and naive peers."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.shapes import Spec, max_message_key, tree_critical_path
from tasktree.client import Client
from tasktree.models import Tree, TreeSpec
from tasktree.settings import load

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {self.name} failed:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Row:
    what: str
    values: list[float] = field(default_factory=list)
    unit: str = "s"

    def fmt(self, scale: float = 1.0, digits: int = 3) -> str:
        if not self.values:
            return "—"
        v = [x * scale for x in self.values]
        med = statistics.median(v)
        if len(v) == 1:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


class Bench:
    def __init__(self, url: str, work: Path, runs: int, concurrency: int) -> None:
        self.url, self.work, self.runs, self.concurrency = url, work, runs, concurrency
        self.r = redis.Redis.from_url(url)
        self.workers: dict[str, Worker] = {}
        self.clients: dict[str, Client] = {}
        self.points: list[tuple[str, float, float]] = []  # (label, critical path, wall)

    def tasktree_worker(
        self, name: str, fanout: int | None, latency: str, extra: dict[str, str] | None = None
    ) -> None:
        tag = uuid.uuid4().hex[:6]
        env = {
            "TASKTREE_REDIS_URL": self.url,
            "TASKTREE_NODE_QUEUE": f"b{tag}",
            "TASKTREE_SYNTH_QUEUE": f"b{tag}.s",
            "TASKTREE_CONCURRENCY": str(self.concurrency),
            "TASKTREE_OFFLINE_LATENCY": latency,
            "TASKTREE_OFFLINE_SEED": "7",
        }
        if fanout:
            env["TASKTREE_OFFLINE_FANOUT"] = str(fanout)
        env.update(extra or {})
        cmd = celery_worker("bench.instrumented", name, self.concurrency)
        self.workers[name] = Worker(name, cmd, env, self.work / f"{name}.log")
        self.clients[name] = Client(
            load(**{k.removeprefix("TASKTREE_").lower(): v for k, v in env.items()})
        )

    def add_process(self, name: str, like: str) -> None:
        """One more worker process on the queues of worker `like` (same settings)."""
        w = self.workers[like]
        cmd = list(w.cmd)
        cmd[cmd.index("-n") + 1] = f"{name}@%h"
        self.workers[name] = Worker(name, cmd, w.env, self.work / f"{name}.log")

    def peer_worker(self, name: str, concurrency: int, queue: str) -> None:
        cmd = [*celery_worker("bench.peers", name, concurrency), "-Q", queue]
        self.workers[name] = Worker(
            name, cmd, {"BENCH_REDIS_URL": self.url}, self.work / f"{name}.log"
        )

    def start_all(self) -> None:
        for w in self.workers.values():
            w.start()
        for w in self.workers.values():
            w.wait_ready()

    def stop_all(self, keep: tuple[str, ...] = ()) -> None:
        for name, w in self.workers.items():
            if name not in keep:
                w.stop()

    def cpu_seconds(self, worker: str) -> float:
        """User + system CPU time a worker process has used so far (Linux /proc)."""
        proc = self.workers[worker].proc
        assert proc is not None
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def largest_message(self, tree_ids: list[str]) -> int:
        """The largest message the workers published for these trees (bench.instrumented)."""
        return max(int(self.r.get(max_message_key(t)) or 0) for t in tree_ids)

    # -- one tree, each system --------------------------------------------------------------

    def tasktree(self, worker: str, spec: Spec, **kw: Any) -> tuple[float, float, Tree]:
        client = self.clients[worker]
        ts = TreeSpec.build(
            client.settings,
            kw.pop("task", "Benchmark tree."),
            max_depth=spec.depth,
            max_children=max(spec.fanout, 1),
            max_nodes=kw.pop("max_nodes", spec.nodes),
            **kw,
        )
        start = time.perf_counter()
        tree = client.wait(client.submit(ts))
        wall = time.perf_counter() - start
        assert tree.status == "completed", tree.status
        return wall, tree_critical_path(tree.nodes), tree

    def bare(self, spec: Spec) -> float:
        from bench.peers import bare_node

        start = time.perf_counter()
        bare_node.apply_async(("0", 0, spec.as_dict(), "peers"), queue="peers").get(timeout=300)
        return time.perf_counter() - start

    def naive(self, spec: Spec, queue: str, timeout: float) -> float | None:
        from bench.peers import naive_node

        start = time.perf_counter()
        try:
            naive_node.apply_async(("0", 0, spec.as_dict(), timeout, queue), queue=queue).get(
                timeout=timeout + 5
            )
        except Exception:  # noqa: BLE001 - a timed-out or deadlocked naive tree: no figure
            return None
        return time.perf_counter() - start


def celery_worker(app: str, name: str, concurrency: int) -> list[str]:
    """The command of one threaded `celery worker` process of `app`."""
    return [
        *(sys.executable, "-m", "celery", "-A", app, "worker", "-n", f"{name}@%h"),
        *("--loglevel", "INFO", "-P", "threads", "-c", str(concurrency)),
    ]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
