"""make bench: tasktree against its critical path, the bare Celery chord floor, and peers."""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Bench, Row  # noqa: E402
from bench.shapes import Spec  # noqa: E402
from tasktree.embedded import EmbeddedRedis  # noqa: E402
from tasktree.models import TreeSpec  # noqa: E402


def run(args: argparse.Namespace) -> tuple[str, list[tuple[str, float, float]]]:
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
        start_workers(b, shapes, lat_fixed, lat_rand, quick)
        lines += overhead(b, shapes)
        lines += parallel(b, shapes, lat_fixed, lat_rand, quick)
        if not quick:
            lines += single_call(b)
            lines += interactive(b)
            lines += scale(b)
        lines += provider_limits(b, quick)
        if not quick:
            lines += defaults_and_processes(b, lat_fixed[0])
            lines += in_flight(b)
    finally:
        b.stop_all()
        for client in b.clients.values():
            client.close(wait=0)
        import gc

        gc.collect()  # let Celery's result objects unsubscribe while Redis is still up
        if server:
            server.stop()
    return "\n".join(lines), b.points


def start_workers(
    b: Bench,
    shapes: list[Spec],
    lat_fixed: tuple[float, float],
    lat_rand: tuple[float, float],
    quick: bool,
) -> None:
    for s in shapes:
        b.tasktree_worker(f"tt{s.depth}x{s.fanout}zero", s.fanout, "0")
        b.tasktree_worker(f"tt{s.depth}x{s.fanout}fixed", s.fanout, f"{lat_fixed[0]}")
        b.tasktree_worker(f"tt{s.depth}x{s.fanout}rand", s.fanout, f"{lat_rand[0]}-{lat_rand[1]}")
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


def overhead(b: Bench, shapes: list[Spec]) -> list[str]:
    lines: list[str] = []
    # 1. Overhead per node at zero latency.
    lines += [
        "## 1. Overhead per node at zero model latency",
        "",
        "Worker CPU per Celery task: the worker process's user + system time (/proc) over the "
        "tree, divided by its tasks (one per node, and one synthesis per delegated node).",
        "",
        "| shape | nodes | tasktree ms/node | bare Celery chord ms/node | ratio "
        "| worker CPU per task: tasktree | bare chord | largest message (bytes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in shapes:
        tt, bare, sizes = Row("tt"), Row("bare"), []
        tt_cpu, bare_cpu = Row("tt cpu"), Row("bare cpu")
        tasks = s.nodes + sum(s.fanout**d for d in range(s.depth))
        name = f"tt{s.depth}x{s.fanout}zero"
        for _ in range(b.runs):
            cpu = b.cpu_seconds(name)
            wall, _, tree = b.tasktree(name, s)
            time.sleep(0.5)  # the last acks and events
            tt_cpu.values.append((b.cpu_seconds(name) - cpu) / tasks)
            tt.values.append(wall / s.nodes)
            sizes.append(b.largest_message([tree.id]))
            cpu = b.cpu_seconds("peers")
            bare.values.append(b.bare(s) / s.nodes)
            time.sleep(0.5)
            bare_cpu.values.append((b.cpu_seconds("peers") - cpu) / tasks)
        ratios = Row("ratio", [a / c for a, c in zip(tt.values, bare.values, strict=True)])
        lines.append(
            f"| depth {s.depth}, fan-out {s.fanout} | {s.nodes} | {tt.fmt(1000, 2)} | "
            f"{bare.fmt(1000, 2)} | {ratios.fmt(1, 2)} | {tt_cpu.fmt(1000, 2)} ms | "
            f"{bare_cpu.fmt(1000, 2)} ms | {max(sizes)} |"
        )
        print(lines[-1], flush=True)

    return lines


def parallel(
    b: Bench,
    shapes: list[Spec],
    lat_fixed: tuple[float, float],
    lat_rand: tuple[float, float],
    quick: bool,
) -> list[str]:
    lines: list[str] = []
    # 2 + 3. Parallel efficiency and peers.
    lines += [
        "",
        "## 2–3. Wall time / critical path, one worker process (peers alongside)",
        "",
        "| shape | latency per call | tasktree | bare Celery chord | naive Celery (c=256) | "
        "naive Celery (c=16) | LangGraph Send |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lg_run: Callable[[Spec], float] | None
    try:
        import langgraph  # noqa: F401

        from bench import langgraph_tree

        lg_run = langgraph_tree.run
    except ImportError:
        lg_run = None
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
                naive = b.naive(s, "peers", 120)
                if naive:
                    rows["naive"].values.append(naive / cp_peer)
                    b.points.append((f"naive Celery {s.depth}x{s.fanout}", cp_peer, naive))
                if lg_run:
                    lg = lg_run(s)
                    rows["lg"].values.append(lg / cp_peer)
                    b.points.append((f"LangGraph {s.depth}x{s.fanout}", cp_peer, lg))
            internal = s.nodes - s.fanout**s.depth
            if internal > 16:  # more blocking parents than pool slots: show what happens, once
                n16 = b.naive(s, "naive16", 15 if not quick else 5)
                deadlock = n16 is None
                if n16:
                    rows["naive16"].values.append(n16 / cp_peer)
                b.r.delete("naive16")  # drop the stranded children of the deadlocked tree
            c16 = "deadlock (no progress in 15 s)" if deadlock else rows["naive16"].fmt(1, 2)
            lines.append(
                f"| depth {s.depth}, fan-out {s.fanout} | {s.latency} s | {rows['tt'].fmt(1, 3)} | "
                f"{rows['bare'].fmt(1, 3)} | {rows['naive'].fmt(1, 3)} | {c16} | {rows['lg'].fmt(1, 3)} |"
            )
            print(lines[-1], flush=True)

    return lines


def defaults_and_processes(b: Bench, short: float) -> list[str]:
    """7. The case a user meets (1.0 s calls, shipped defaults), and a second worker process
    on the same queue beside the first (this machine has two cores)."""
    lines = [
        "",
        "## 7. Shipped defaults: 1.0 s per call, one and two worker processes",
        "",
        "Depth 3, fan-out 5 (156 nodes), wall time / critical path, every setting at its "
        "default (threads, concurrency 256 per process).",
        "",
        "| latency per call | one worker process | two worker processes |",
        "| --- | --- | --- |",
    ]
    # Only these workers run now: idle worker processes poll Redis and take CPU.
    b.stop_all()
    started = []
    for latency in (1.0, short):
        one, two = f"one{latency}", f"two{latency}"
        b.tasktree_worker(one, 5, str(latency))
        b.tasktree_worker(two, 5, str(latency))
        b.add_process(f"{two}b", two)
        started += [one, two, f"{two}b"]
    for name in started:
        b.workers[name].start()
    for name in started:
        b.workers[name].wait_ready()
    for name in started:
        if name in b.clients:
            b.tasktree(name, Spec(1, 2))  # unmeasured: first-call costs
    shape = Spec(3, 5)
    for latency in (1.0, short):
        one, two = f"one{latency}", f"two{latency}"
        s = Spec(shape.depth, shape.fanout, latency, latency, seed=7)
        rows = {k: Row(k) for k in (one, two)}
        for _ in range(b.runs):
            for name in (one, two):
                wall, cp, _ = b.tasktree(name, s)
                rows[name].values.append(wall / cp)
        lines.append(f"| {latency} s | {rows[one].fmt(1, 3)} | {rows[two].fmt(1, 3)} |")
        print(lines[-1], flush=True)
    return lines


def in_flight(b: Bench) -> list[str]:
    """8. A thousand model calls in flight on one worker process: 10 s calls, fan-out 32,
    depth 2 (1,057 nodes, 1,024 leaves), the concurrency raised to hold them all."""
    b.stop_all()
    name, spec = "inflight", Spec(2, 32, 10.0, 10.0, seed=7)
    b.tasktree_worker(name, spec.fanout, "10.0", {"TASKTREE_CONCURRENCY": "1100"})
    cmd = b.workers[name].cmd
    cmd[cmd.index("-c") + 1] = "1100"
    b.workers[name].start()
    b.workers[name].wait_ready()
    proc = b.workers[name].proc
    assert proc is not None
    idle = rss_mib(proc.pid, "VmRSS")
    threads = [0]
    done = threading.Event()

    def sample() -> None:  # the worker's threads, every half second
        while not done.wait(0.5):
            threads[0] = max(threads[0], int(proc_status(proc.pid)["Threads"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, cp, tree = b.tasktree(name, spec)
    done.set()
    sampler.join()
    peak = rss_mib(proc.pid, "VmHWM")
    leaves = [n for n in tree.nodes if n.depth == spec.depth]
    # The most leaves whose model call was running at one moment, from their stored times.
    edges = sorted(
        [(n.call_at or 0.0, 1) for n in leaves] + [(n.finished_at or 0.0, -1) for n in leaves]
    )
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    lines = [
        "",
        "## 8. A thousand model calls in flight on one worker process",
        "",
        f"10 s per call, fan-out 32, depth 2: {len(tree.nodes)} nodes, {len(leaves)} leaves; "
        "one worker process with `TASKTREE_CONCURRENCY=1100`. One run.",
        "",
        "| leaf calls running at once (most) | wall s | wall / critical path "
        "| resident memory idle → peak | threads (most) |",
        "| --- | --- | --- | --- | --- |",
        f"| {most} of {len(leaves)} | {wall:.1f} | {wall / cp:.3f} | "
        f"{idle:.0f} → {peak:.0f} MiB | {threads[0]} |",
    ]
    print(lines[-1], flush=True)
    b.workers[name].stop()
    return lines


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def rss_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in MiB."""
    return int(proc_status(pid)[field].split()[0]) / 1024


def single_call(b: Bench) -> list[str]:
    lines: list[str] = []
    # Single-call mode on a task of ten parts (the children are leaves above the depth limit).
    task = "Write a report. This includes " + ", ".join(f"part {c}" for c in "ABCDEFGHIJ") + "."
    lines += [
        "",
        "## Single-call mode (ten-part task, 0.2 s per call)",
        "",
        "| mode | LLM calls | tokens (offline count) | wall s |",
        "| --- | --- | --- | --- |",
    ]
    for single in (False, True):
        walls, calls, tokens = [], 0, 0
        for _ in range(b.runs):
            wall, _, tree = b.tasktree("ttparts", Spec(3, 10), task=task, single_call=single)
            walls.append(wall)
            calls, tokens = tree.calls, tree.tokens
        lines.append(
            f"| {'--single-call' if single else 'decide + execute'} | {calls} | "
            f"{tokens} | {Row('w', walls).fmt(1, 3)} |"
        )
        print(lines[-1], flush=True)

    return lines


#: The CLI as the base install runs it: without the `otel` extra, whose SDK redis-py imports
#: at `import redis` when it is installed (this venv has it, for the tests).
BASE_INSTALL = (
    "import sys; sys.modules['opentelemetry'] = None; from tasktree.__main__ import main; "
    "sys.argv = ['tasktree', *sys.argv[1:]]; main()"
)


def interactive(b: Bench) -> list[str]:
    # 5. Interactive latency.
    w = b.workers["tt3x5zero"]
    env = {**os.environ, **w.env}
    tid = b.clients["tt3x5zero"].store.list_trees(1)[0][0].id
    commands = {"submit": ["submit", "Quick.", "--no-wait"], "tree": ["tree", tid]}
    rows = {(name, base): Row(name) for name in commands for base in (False, True)}
    for _ in range(5):
        for (name, base), row in rows.items():
            python = (
                [sys.executable, "-c", BASE_INSTALL] if base else [sys.executable, "-m", "tasktree"]
            )
            t = time.perf_counter()
            out = subprocess.run(
                [*python, *commands[name]], env=env, capture_output=True, check=True, text=True
            )
            row.values.append(time.perf_counter() - t)
            if name == "submit":  # its tree runs now: not beside the next command timed
                b.clients["tt3x5zero"].wait(out.stdout.strip(), timeout=60)
    lines = [
        "",
        "## 5. Interactive latency (5 runs, whole process)",
        "",
        "| command | no OTel SDK (a base install; hidden here) | with the `otel` extra (this venv) |",
        "| --- | --- | --- |",
        f"| `tasktree submit --no-wait` | {rows['submit', True].fmt(1, 3)} | "
        f"{rows['submit', False].fmt(1, 3)} |",
        f"| `tasktree tree ID` (156 nodes) | {rows['tree', True].fmt(1, 3)} | "
        f"{rows['tree', False].fmt(1, 3)} |",
    ]
    print(lines[-2:], flush=True)
    return lines


def scale(b: Bench) -> list[str]:
    lines: list[str] = []
    # 4. Scale: only the scale worker left running, so Redis counts are its own.
    b.stop_all(keep=("tt2x10zero",))
    time.sleep(2)
    lines += [
        "",
        "## 4. Scale (zero latency, one worker process)",
        "",
        "| run | nodes | wall s | Redis memory per node | stored per node (its text) "
        "| Redis commands per node | largest message |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, count, depth, cap in (
        ("one 1,000-node tree", 1, 3, 1000),
        ("10 trees of 100 at once", 10, 2, 100),
    ):
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
        stored, text = stored_per_node(b, trees)
        lines.append(
            f"| {label} | {nodes} | {wall:.2f} | {mem / 1024:.2f} KiB | "
            f"{stored / 1024:.2f} KiB ({text / 1024:.2f} KiB) | {cmds:.1f} | "
            f"{b.largest_message(ids)} B |"
        )
        print(lines[-1], flush=True)
    return lines


def stored_per_node(b: Bench, trees: list[Any]) -> tuple[float, float]:
    """What the trees' own keys take in Redis (MEMORY USAGE), per node, and how much of that
    is the nodes' text (persona, instructions, result): the rest is the per-node overhead."""
    from tasktree import keys

    names = [k for tr in trees for k in keys.of_tree(tr.id, [n.id for n in tr.nodes])]
    pipe = b.r.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    stored = sum(size or 0 for size in pipe.execute())
    nodes = [n for tr in trees for n in tr.nodes]
    text = sum(len(n.persona) + len(n.instructions) + len(n.result or "") for n in nodes)
    return stored / len(nodes), text / len(nodes)


def provider_limits(b: Bench, quick: bool) -> list[str]:
    """A provider that allows 8 calls at once (429 with Retry-After above), through litellm's
    real HTTP client: one worker process with the limit configured, and one without; and a
    wider tree, where a scheduler can come nearer the provider's floor, with the limit."""
    from tests.helpers import RateLimitedProvider

    cap, latency = (8, 0.05) if quick else (8, 0.5)
    rows = [
        "",
        f"## 6. A rate-limited provider ({cap} calls at once, {latency} s per call)",
        "",
        f"An OpenAI-compatible server started by the benchmark answers {cap} calls at once and a "
        "429 (`Retry-After: 1`) above that. The root splits into W sections of W parts: "
        "1 + 2W + W² + 1 calls, and calls / 8 × latency is the provider's floor. No schedule "
        "reaches it: the root's decision and its synthesis each run alone, so the least any "
        "scheduler takes is (2 + ⌈(calls − 2) / 8⌉) × latency. One worker process (256 threads), "
        "after one unmeasured tree.",
        "",
        "| W | calls | floor s | least schedule s | limits | wall s | wall / floor "
        "| wall / least schedule | 429s received | failed nodes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with_limit = {"TASKTREE_LLM_CONCURRENCY": str(cap)}
    cases = [(3, True), (3, False)] if quick else [(10, True), (10, False), (20, True)]
    for width, limit in cases:
        with RateLimitedProvider(cap, latency, sections=width, parts=width) as provider:
            rows.append(limited_tree(b, provider, width, with_limit if limit else {}))
    return rows


def limited_tree(b: Bench, provider: Any, width: int, extra: dict[str, str]) -> str:
    from tasktree import keys

    cap, latency = provider.capacity, provider.latency
    spec = Spec(2, width)
    calls = 1 + width + width * width + width + 1
    floor = calls / cap * latency
    schedule = (2 + math.ceil((calls - 2) / cap)) * latency
    model = "openai/bench"
    env = {"TASKTREE_MODEL": model, "TASKTREE_API_BASE": provider.url}
    env["TASKTREE_API_KEY"] = "sk-bench"
    name = f"provider{width}x{len(extra)}"
    b.tasktree_worker(name, None, "0", {**env, **extra})
    worker = b.workers[name]
    worker.start()
    worker.wait_ready()
    b.tasktree(name, Spec(1, 2), task="Write the report.")  # the first call imports litellm
    walls, refused, failed = [], [], []
    for _ in range(b.runs):
        b.r.delete(keys.adapted(model))  # each run starts with no cut from the last
        before = provider.refused
        wall, _, tree = b.tasktree(name, spec, task="Write the report.")
        walls.append(wall)
        refused.append(provider.refused - before)
        failed.append(sum(1 for n in tree.nodes if n.status == "failed"))
    worker.stop()
    label = f"`TASKTREE_LLM_CONCURRENCY={cap}`" if extra else "none (429s cut the concurrency)"
    ratio = Row("", [w / floor for w in walls]).fmt(digits=3)
    least = Row("", [w / schedule for w in walls]).fmt(digits=3)
    row = (
        f"| {width} | {calls} | {floor:.2f} | {schedule:.2f} | {label} | "
        f"{Row('', walls).fmt(digits=2)} | {ratio} | {least} | "
        f"{Row('', [float(x) for x in refused]).fmt(digits=0)} | {max(failed)} |"
    )
    print(row, flush=True)
    return row


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


TARGETS = "## Against the targets"


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
    png: Path | None = out.with_name("bench_wall_vs_critical_path.png")
    if points and png:
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
    # The hand-written reading of the tables, from its heading on, is kept as it was.
    kept = out.read_text().partition(TARGETS)[1:] if out.exists() else ("", "")
    out.write_text("\n".join(head) + body + "\n" + ("\n" + "".join(kept) if kept[0] else ""))
    print(f"wrote {out} in {took:.0f} s", flush=True)
    # Celery's AsyncResult.__del__ unsubscribes from a Redis already stopped when the
    # interpreter tears down: leave without the teardown, as the CLI does.
    os._exit(0)


if __name__ == "__main__":
    main()
