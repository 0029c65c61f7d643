"""make bench: tasktree against its critical path, the bare Celery chord floor, and peers."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.shapes import Spec, tree_critical_path  # noqa: E402
from tasktree.client import Client  # noqa: E402
from tasktree.embedded import EmbeddedRedis  # noqa: E402
from tasktree.models import TreeSpec  # noqa: E402
from tasktree.settings import load  # noqa: E402


@dataclass
class Worker:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

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
            if self.proc.poll() is not None or time.monotonic() > deadline:
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

    def tasktree_worker(self, name: str, fanout: int | None, latency: str) -> None:
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
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.instrumented",
            "worker",
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "-P",
            "threads",
            "-c",
            str(self.concurrency),
        ]
        self.workers[name] = Worker(name, cmd, env, self.work / f"{name}.log")
        self.clients[name] = Client(
            load(**{k.removeprefix("TASKTREE_").lower(): v for k, v in env.items()})
        )

    def peer_worker(self, name: str, concurrency: int, queue: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.peers",
            "worker",
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "-P",
            "threads",
            "-c",
            str(concurrency),
            "-Q",
            queue,
        ]
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

    # -- one tree, each system --------------------------------------------------------------

    def tasktree(self, worker: str, spec: Spec, **kw) -> tuple[float, float, object]:
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
        except Exception:
            return None
        return time.perf_counter() - start


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="tasktree-bench-"))
    server = None
    url = os.environ.get("TASKTREE_REDIS_URL")
    if not url:
        server = EmbeddedRedis(work / "redis", appendonly=False)
        url = server.start()
    os.environ["BENCH_REDIS_URL"] = url  # for bench.peers, here and in its workers
    quick = args.quick
    shapes = [Spec(1, 3)] if quick else [Spec(3, 5), Spec(2, 10)]
    lat_fixed, lat_rand = ((0.01, 0.01), (0.005, 0.02)) if quick else ((0.2, 0.2), (0.05, 0.5))
    b = Bench(url, work, 1 if quick else args.runs, 64 if quick else 256)
    lines: list[str] = []
    try:
        for s in shapes:
            b.tasktree_worker(f"tt{s.depth}x{s.fanout}zero", s.fanout, "0")
            b.tasktree_worker(f"tt{s.depth}x{s.fanout}fixed", s.fanout, f"{lat_fixed[0]}")
            b.tasktree_worker(
                f"tt{s.depth}x{s.fanout}rand", s.fanout, f"{lat_rand[0]}-{lat_rand[1]}"
            )
        if not quick:
            b.tasktree_worker("ttparts", None, f"{lat_fixed[0]}")
        b.peer_worker("peers", b.concurrency, "peers")
        b.peer_worker("naive16", 16, "naive16")
        t0 = time.perf_counter()
        b.start_all()
        print(f"workers ready in {time.perf_counter() - t0:.1f} s", flush=True)
        warm = Spec(1, 2)  # one unmeasured tree per worker: first-call costs are not overhead
        for name in b.clients:
            b.tasktree(name, warm)
        b.bare(warm)
        b.naive(warm, "peers", 30)

        # 1. Overhead per node at zero latency.
        lines += [
            "## 1. Overhead per node at zero model latency",
            "",
            "| shape | nodes | tasktree ms/node | bare Celery chord ms/node | ratio | largest message (bytes) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s in shapes:
            tt, bare, sizes = Row("tt"), Row("bare"), []
            for _ in range(b.runs):
                b.r.delete("bench:max-message")
                wall, _, tree = b.tasktree(f"tt{s.depth}x{s.fanout}zero", s)
                tt.values.append(wall / s.nodes)
                sizes.append(int(b.r.get("bench:max-message") or 0))
                bare.values.append(b.bare(s) / s.nodes)
            ratios = Row("ratio", [a / c for a, c in zip(tt.values, bare.values, strict=True)])
            lines.append(
                f"| depth {s.depth}, fan-out {s.fanout} | {s.nodes} | {tt.fmt(1000, 2)} | "
                f"{bare.fmt(1000, 2)} | {ratios.fmt(1, 2)} | {max(sizes)} |"
            )
            print(lines[-1], flush=True)

        # 2 + 3. Parallel efficiency and peers.
        lines += [
            "",
            "## 2–3. Wall time / critical path, one worker process (peers alongside)",
            "",
            "| shape | latency per call | tasktree | bare Celery chord | naive Celery (c=256) | "
            "naive Celery (c=16) | LangGraph Send |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        try:
            import langgraph  # noqa: F401

            from bench import langgraph_tree
        except ImportError:
            langgraph_tree = None
        for s0 in shapes:
            for kind, (lo, hi) in (("fixed", lat_fixed), ("rand", lat_rand)):
                s = Spec(s0.depth, s0.fanout, lo, hi, seed=7)
                cp_peer = s.critical_path()
                rows = {k: Row(k) for k in ("tt", "bare", "naive", "naive16", "lg")}
                deadlock = False
                for _ in range(b.runs):
                    wall, cp, _ = b.tasktree(f"tt{s.depth}x{s.fanout}{kind}", s)
                    rows["tt"].values.append(wall / cp)
                    b.points.append((f"tasktree {s.depth}x{s.fanout}", cp, wall))
                    w = b.bare(s)
                    rows["bare"].values.append(w / cp_peer)
                    b.points.append((f"bare chord {s.depth}x{s.fanout}", cp_peer, w))
                    w = b.naive(s, "peers", 120)
                    if w:
                        rows["naive"].values.append(w / cp_peer)
                        b.points.append((f"naive Celery {s.depth}x{s.fanout}", cp_peer, w))
                    if langgraph_tree:
                        w = langgraph_tree.run(s)
                        rows["lg"].values.append(w / cp_peer)
                        b.points.append((f"LangGraph {s.depth}x{s.fanout}", cp_peer, w))
                internal = s.nodes - s.fanout**s.depth
                if internal > 16:  # more blocking parents than pool slots: show what happens, once
                    w = b.naive(s, "naive16", 15 if not quick else 5)
                    deadlock = w is None
                    if w:
                        rows["naive16"].values.append(w / cp_peer)
                    b.r.delete("naive16")  # drop the stranded children of the deadlocked tree
                n16 = "deadlock (no progress in 15 s)" if deadlock else rows["naive16"].fmt(1, 2)
                lines.append(
                    f"| depth {s.depth}, fan-out {s.fanout} | {s.latency} s | {rows['tt'].fmt(1, 3)} | "
                    f"{rows['bare'].fmt(1, 3)} | {rows['naive'].fmt(1, 3)} | {n16} | {rows['lg'].fmt(1, 3)} |"
                )
                print(lines[-1], flush=True)

        if not quick:
            # Single-call mode on a task of ten parts (the children are leaves above the depth limit).
            task = (
                "Write a report. This includes "
                + ", ".join(f"part {c}" for c in "ABCDEFGHIJ")
                + "."
            )
            lines += [
                "",
                "## Single-call mode (ten-part task, 0.2 s per call)",
                "",
                "| mode | LLM calls | tokens (offline count) | wall s |",
                "| --- | --- | --- | --- |",
            ]
            for single in (False, True):
                walls, tree = [], None
                for _ in range(b.runs):
                    wall, _, tree = b.tasktree(
                        "ttparts", Spec(3, 10), task=task, single_call=single
                    )
                    walls.append(wall)
                lines.append(
                    f"| {'--single-call' if single else 'decide + execute'} | {tree.calls} | "
                    f"{tree.tokens} | {Row('w', walls).fmt(1, 3)} |"
                )
                print(lines[-1], flush=True)

            # 5. Interactive latency.
            w = b.workers["tt3x5zero"]
            env = {**os.environ, **w.env}
            tid = b.clients["tt3x5zero"].store.list_trees(1)[0].id
            sub, tree_cmd = Row("submit"), Row("tree")
            for _ in range(5):
                t = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "tasktree", "submit", "Quick.", "--no-wait"],
                    env=env,
                    capture_output=True,
                    check=True,
                )
                sub.values.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "tasktree", "tree", tid],
                    env=env,
                    capture_output=True,
                    check=True,
                )
                tree_cmd.values.append(time.perf_counter() - t)
            lines += [
                "",
                "## 5. Interactive latency (5 runs, whole process)",
                "",
                "| command | seconds |",
                "| --- | --- |",
                f"| `python -m tasktree submit --no-wait` | {sub.fmt(1, 3)} |",
                f"| `python -m tasktree tree ID` (156 nodes) | {tree_cmd.fmt(1, 3)} |",
            ]
            print(lines[-3:], flush=True)

            # 4. Scale: only the scale worker left running, so Redis counts are its own.
            b.stop_all(keep=("tt2x10zero",))
            time.sleep(2)
            lines += [
                "",
                "## 4. Scale (zero latency, one worker process)",
                "",
                "| run | nodes | wall s | Redis memory per node | Redis commands per node | largest message |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for label, count, depth, cap in (
                ("one 1,000-node tree", 1, 3, 1000),
                ("10 trees of 100 at once", 10, 2, 100),
            ):
                b.r.delete("bench:max-message")
                b.r.config_resetstat()
                mem0 = b.r.info("memory")["used_memory"]
                client = b.clients["tt2x10zero"]
                t = time.perf_counter()
                ids = [
                    client.submit(
                        TreeSpec.build(
                            client.settings,
                            f"Scale {i}.",
                            max_depth=depth,
                            max_children=10,
                            max_nodes=cap,
                        )
                    )
                    for i in range(count)
                ]
                trees = [client.wait(i) for i in ids]
                wall = time.perf_counter() - t
                nodes = sum(len(tr.nodes) for tr in trees)
                assert all(tr.status == "completed" for tr in trees)
                mem = (b.r.info("memory")["used_memory"] - mem0) / nodes
                cmds = sum(v["calls"] for k, v in b.r.info("commandstats").items()) / nodes
                lines.append(
                    f"| {label} | {nodes} | {wall:.2f} | {mem / 1024:.2f} KiB | {cmds:.1f} | "
                    f"{int(b.r.get('bench:max-message') or 0)} B |"
                )
                print(lines[-1], flush=True)
    finally:
        b.stop_all()
        import gc

        gc.collect()  # let Celery's result objects unsubscribe while Redis is still up
        if server:
            server.stop()
    return "\n".join(lines), b.points


def plot(points: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    labels = sorted({p[0] for p in points})
    for label in labels:
        xs = [p[1] for p in points if p[0] == label]
        ys = [p[2] for p in points if p[0] == label]
        ax.scatter(xs, ys, label=label, s=18)
    top = max(max(p[1], p[2]) for p in points) * 1.05
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="wall = critical path")
    ax.set_xlabel("critical path (s, from the calls' latencies)")
    ax.set_ylabel("wall time (s)")
    ax.set_title("Wall time against critical path, one worker process")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny trees)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    start = time.perf_counter()
    body, points = run(args)
    took = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name("bench_wall_vs_critical_path.png")
    if points:
        try:
            plot(points, png)
        except ImportError:
            png = None
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench --runs {args.runs}`) on {time.strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}, "
        f"Redis embedded unless TASKTREE_REDIS_URL was set. The whole run took {took:.0f} s.",
        f"Each figure is the median of {1 if args.quick else args.runs} runs, with the range (min–max) "
        "in brackets. Model calls are the offline model's, sleeping the latency given "
        "(seeded random per call where a range is given).",
        "",
    ]
    if png:
        head += [f"![wall time against critical path]({png.name})", ""]
    out.write_text("\n".join(head) + body + "\n")
    print(f"wrote {out} in {took:.0f} s")


if __name__ == "__main__":
    main()
