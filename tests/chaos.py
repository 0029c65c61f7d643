"""The chaos suite: many trees on real workers and a real Redis under a seeded schedule of
faults, then the invariants every tree must keep.

    python -m tests.chaos [--seed N] [--trees N] [--workers N] [--faults N] [--fast]

Faults: kill -9 of a worker (a fresh one replaces it), a worker frozen (SIGSTOP) past the
lease then resumed, Redis restarted (append-only file), Redis paused (SIGSTOP). The model is
the offline one with seeded random latency, failing transiently at random
(`tests/chaos_app.py`). Settings are the shipped defaults unless `--fast` (lease 3 s, stall
3 s, visibility 10 s: the version `make test` runs). Exits 1 on any invariant violation.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasktree import keys
from tasktree.client import Client
from tasktree.errors import TaskTreeError
from tasktree.models import Tree, TreeSpec
from tasktree.settings import load
from tests.helpers import RedisServer, WorkerProcess

FAST = {
    "TASKTREE_STEP_LEASE": "3",
    "TASKTREE_STALL_SECONDS": "3",
    "TASKTREE_VISIBILITY_TIMEOUT": "10",
    "TASKTREE_RESTORE_INTERVAL": "1",
    "TASKTREE_SWEEP_INTERVAL": "1",
}
ACCEPTED = "chaos:accepted"  # the chaos model lists every reply it gives here (set of ids)
KINDS = ("kill", "freeze", "redis-restart", "redis-pause")


@dataclass
class Fault:
    kind: str
    at: float  # monotonic time the fault began
    watch: list[tuple[str, str]]  # (tree, node) the fault hit: open, on the faulted worker
    trees: list[str]  # trees running when it began
    recovered: float | None = None  # seconds from the fault until what it hit moved on


@dataclass
class Report:
    trees: int = 0
    nodes: int = 0
    faults: list[Fault] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    recorded: int = 0
    waste: int = 0
    accepted: int = 0
    failed_calls: int = 0
    unacked: int = 0  # messages of killed workers still waiting out the visibility timeout
    seconds: float = 0.0


class Chaos:
    def __init__(self, seed: int, trees: int, workers: int, faults: int, fast: bool, work: Path):
        self.rng = random.Random(seed)
        self.seed, self.n_trees, self.n_workers, self.n_faults = seed, trees, workers, faults
        self.fast = fast
        self.work = work
        self.redis = RedisServer(work / "redis", "--appendonly", "yes", "--appendfsync", "always")
        self.url = f"redis://127.0.0.1:{self.redis.port}/0"
        tag = uuid.uuid4().hex[:8]
        self.env = {
            "TASKTREE_ENV_FILE": "/dev/null",
            "TASKTREE_REDIS_URL": self.url,
            "TASKTREE_NODE_QUEUE": f"chaos-{tag}",
            "TASKTREE_SYNTH_QUEUE": f"chaos-{tag}.synth",
            "TASKTREE_OFFLINE_LATENCY": "0.2-1.0",
            "TASKTREE_OFFLINE_FANOUT": "3",
            "TASKTREE_OFFLINE_SEED": str(seed),
            "TASKTREE_CHAOS_FAIL_RATE": "0.1",
            "TASKTREE_CONCURRENCY": "4",
            **(FAST if fast else {}),
        }
        self.lease = float(self.env.get("TASKTREE_STEP_LEASE", "15"))
        self.workers: list[WorkerProcess] = []
        self.spawned = 0
        self.report = Report()

    # -- processes -----------------------------------------------------------------------

    def spawn(self) -> WorkerProcess:
        self.spawned += 1
        w = WorkerProcess(self.env, f"c{self.spawned}@%h", self.work, app="tests.chaos_app")
        self.workers.append(w)
        return w

    def stop_all(self) -> None:
        for w in self.workers:
            w.kill()
        self.redis.stop()

    # -- the run -------------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        self.redis.start()
        for w in [self.spawn() for _ in range(self.n_workers)]:
            w.wait_ready()
        settings = load(**{k.removeprefix("TASKTREE_").lower(): v for k, v in self.env.items()})
        client = Client(settings)
        client.store.r.delete(ACCEPTED)
        trees: list[str] = []
        batches = [self.n_trees // (self.n_faults + 1)] * (self.n_faults + 1)
        batches[0] += self.n_trees - sum(batches)  # the rest go in before the first fault
        for i, batch in enumerate(batches):
            for _ in range(batch):  # 13 or 40 nodes (fan-out 3, depth 2 or 3)
                depth = self.rng.choice((2, 2, 3))
                task = f"Chaos tree {len(trees)} of seed {self.seed}."
                trees.append(client.submit(TreeSpec.build(settings, task, max_depth=depth)))
            if i < self.n_faults:
                time.sleep(self.rng.uniform(1, 4))
                running = [t for t in trees if not client.tree(t, with_nodes=False).terminal]
                if not running:  # every fault hits work in progress
                    task = f"Chaos tree {len(trees)} of seed {self.seed}."
                    trees.append(client.submit(TreeSpec.build(settings, task, max_depth=3)))
                    running = trees[-1:]
                    time.sleep(2)
                self.inject(client, running)
        deadline = time.monotonic() + (120 if self.fast else 600)
        for t in trees:
            try:
                client.wait(t, timeout=max(1.0, deadline - time.monotonic()))
            except TaskTreeError as e:  # a tree that never ends is a violation, not a crash
                self.report.violations.append(f"tree {t} did not finish: {e}")
        self.settle(client)
        self.check(client, trees)
        self.report.seconds = time.monotonic() - started
        return self.report

    def inject(self, client: Client, running: list[str]) -> None:
        """One fault, undone on a timer while its recovery is watched from its start."""
        kind = self.rng.choice(KINDS)
        undo: threading.Thread | None = None
        if kind in ("kill", "freeze"):
            victim = self.rng.choice([w for w in self.workers if w.proc.poll() is None])
            prefix = victim.name.split("@")[0] + "@"
            hit = [
                (t, n.id)
                for t in running
                for n in client.tree(t).nodes
                if not n.terminal and n.worker.startswith(prefix)
            ]
            fault = Fault(kind, time.monotonic(), hit, running)
            if kind == "kill":
                victim.kill()
                undo = self.later(0, lambda: self.spawn().wait_ready())
            else:
                os.killpg(victim.proc.pid, signal.SIGSTOP)
                undo = self.later(
                    self.lease + 5, lambda: os.killpg(victim.proc.pid, signal.SIGCONT)
                )
        else:
            fault = Fault(kind, time.monotonic(), [], running)
            server = self.redis
            assert server.proc is not None
            if kind == "redis-restart":
                server.stop()
                undo = self.later(self.rng.uniform(1, 3), server.start)
            else:
                server.proc.send_signal(signal.SIGSTOP)
                proc = server.proc
                undo = self.later(self.rng.uniform(2, 8), lambda: proc.send_signal(signal.SIGCONT))
        self.report.faults.append(fault)
        self.watch_recovery(client, fault)
        undo.join()

    @staticmethod
    def later(seconds: float, action: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            time.sleep(seconds)
            action()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def watch_recovery(self, client: Client, fault: Fault) -> None:
        """Seconds from the fault until every node it hit closed (a worker fault), or every
        tree it hit made progress again (a Redis fault)."""
        before = {t: client.tree(t, with_nodes=False).done for t in fault.trees}
        deadline = fault.at + (90 if self.fast else 300)
        while time.monotonic() < deadline:
            if fault.watch:
                done = all(client.store.node(t, n).terminal for t, n in fault.watch)
            else:
                done = all(
                    (tree := client.tree(t, with_nodes=False)).done > before[t] or tree.terminal
                    for t in fault.trees
                )
            if done:
                fault.recovered = time.monotonic() - fault.at
                return
            time.sleep(0.1)

    def settle(self, client: Client) -> None:
        """Let the live index empty: every member ended, or went stale and was taken."""
        live = keys.live(client.settings.node_queue)
        deadline = time.monotonic() + 3 * self.lease + 10
        while client.store.r.zcard(live) and time.monotonic() < deadline:
            time.sleep(0.2)

    # -- invariants ----------------------------------------------------------------------

    def check(self, client: Client, tree_ids: list[str]) -> None:
        rep, r = self.report, client.store.r
        for tid in tree_ids:
            tree = client.tree(tid)
            rep.trees += 1
            rep.nodes += len(tree.nodes)
            rep.recorded += tree.calls
            rep.waste += tree.waste_calls
            rep.failed_calls += sum(n.failed_calls for n in tree.nodes)
            self.check_tree(client, tree)
        rep.accepted = int(r.scard(ACCEPTED))
        in_flight = len(rep.faults) * self.n_workers * int(self.env["TASKTREE_CONCURRENCY"])
        if not rep.recorded + rep.waste <= rep.accepted <= rep.recorded + rep.waste + in_flight:
            rep.violations.append(
                f"calls: {rep.recorded} recorded + {rep.waste} waste vs {rep.accepted} answered"
            )
        for queue in (client.settings.node_queue, client.settings.synth_queue):
            if r.llen(queue):
                rep.violations.append(f"{r.llen(queue)} messages left in queue {queue}")
        live = keys.live(client.settings.node_queue)
        if r.zcard(live):
            left = r.zrange(live, 0, -1, withscores=True)
            rep.violations.append(f"the live index did not empty: {left} at {r.time()}")
        for raw in r.hvals("unacked"):  # a killed worker's messages, back after the visibility
            named = unacked_node(raw)  # timeout: each must name a node already closed
            if named is None or not client.store.node(*named).terminal:
                rep.violations.append(f"unacked message for an open node: {named}")
            else:
                rep.unacked += 1

    def check_tree(self, client: Client, tree: Tree) -> None:
        v = self.report.violations
        if tree.status != "completed":
            failed = "; ".join(f"{n.id}: {n.error}" for n in tree.nodes if n.error)
            v.append(f"tree {tree.id} ended {tree.status} ({failed})")
        events = client.store.events(tree.id)
        for n in tree.nodes:
            if not n.terminal:
                v.append(f"tree {tree.id} node {n.id} left {n.status}")
            want = 2 if n.children else 1  # decide + execute/synthesize; a leaf at the limit: 1
            if n.calls != want:
                v.append(f"tree {tree.id} node {n.id}: {n.calls} calls recorded, {want} made")
            closed = [e for _, e in events if e.get("node") == n.id and e.get("status") == n.status]
            if len(closed) != 1:
                v.append(f"tree {tree.id} node {n.id} closed {len(closed)} times")
        ends = [e for _, e in events if e.get("tree") == tree.status]
        if len(ends) != 1:
            v.append(f"tree {tree.id} ended {len(ends)} times")


def unacked_node(raw: str) -> tuple[str, str] | None:
    """(tree, node) that an unacknowledged kombu message names, or None."""
    try:
        message = json.loads(raw)[0]
        args = json.loads(base64.b64decode(message["body"]))[0]
        if message["headers"]["task"] == "tasktree.node":
            return args[0]["tree_id"], args[0]["node_id"]
        return args[0], args[1]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def table(rep: Report, seed: int, fast: bool) -> str:
    rows = [
        f"chaos seed {seed} ({'test settings: lease 3 s, stall 3 s' if fast else 'shipped defaults'})",
        f"trees {rep.trees}, nodes {rep.nodes}, faults {len(rep.faults)}, "
        f"{rep.seconds:.0f} s in all",
        f"calls: {rep.recorded} recorded, {rep.waste} waste, {rep.accepted} answered by the "
        f"model, {rep.failed_calls} failed transiently and retried",
        f"messages of killed workers still unacknowledged (all for closed nodes): {rep.unacked}",
        "",
        f"{'fault':<14} {'n':>3} {'p50 s':>7} {'p95 s':>7} {'max s':>7}  unrecovered",
    ]
    for kind in KINDS:
        faults = [f for f in rep.faults if f.kind == kind]
        times = sorted(f.recovered for f in faults if f.recovered is not None)
        if not faults:
            continue
        p50 = statistics.median(times) if times else float("nan")
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))] if times else float("nan")
        top = times[-1] if times else float("nan")
        rows.append(
            f"{kind:<14} {len(faults):>3} {p50:>7.1f} {p95:>7.1f} {top:>7.1f}  "
            f"{len(faults) - len(times)}"
        )
    rows.append("")
    rows.append(f"invariant violations: {len(rep.violations)}")
    rows.extend(f"  {v}" for v in rep.violations)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trees", type=int, default=20)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--faults", type=int, default=12)
    ap.add_argument("--fast", action="store_true", help="test settings: short leases")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tasktree-chaos-") as work:
        chaos = Chaos(args.seed, args.trees, args.workers, args.faults, args.fast, Path(work))
        try:
            rep = chaos.run()
        finally:
            chaos.stop_all()
    print(table(rep, args.seed, args.fast))
    return 1 if rep.violations else 0


if __name__ == "__main__":
    sys.exit(main())
