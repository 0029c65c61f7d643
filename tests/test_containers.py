"""The agent image and the compose stack on a real Docker engine: built, brought up with three
workers, trees submitted from the host, a worker container killed, Redis's container restarted.

Skipped, with the reason, when no engine answers (`.ci/run` starts one when it can). What this
machine needs beyond an ordinary Docker host (builds on the host network, Redis published on a
free port) is in the override file written here, never in the project's own files."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tasktree
from tasktree.client import Client
from tasktree.embedded import free_port
from tasktree.settings import load
from tests.helpers import ROOT

# The first test also waits for the image build and the stack to come up.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(600)]

IMAGE = "tasktree-agent:latest"
#: The calls of a fan-out-3, depth-3 offline tree: 13 decisions, 27 leaves, 13 syntheses.
FULL_TREE_CALLS = 53
HEALTHY_WITHIN = 90.0


def engine_problem() -> str | None:
    """Why the tests cannot run here, or None."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (start an engine: ../shared/container-engine/start)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 20 s"
    if info.returncode != 0:
        return f"no Docker engine answers: {(info.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def sh(*cmd: str, cwd: Path | None = None, timeout: float = 300, check: bool = True) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


@dataclass
class Stack:
    dir: Path
    project: str
    redis_url: str
    secrets: dict[str, str]
    build_seconds: float
    up_at: float
    web_url: str = ""

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return sh(
            "docker-compose",
            "-p",
            self.project,
            "-f",
            "docker-compose.yml",
            "-f",
            "override.yml",
            *args,
            cwd=self.dir,
            timeout=timeout,
            check=check,
        )

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    def health(self, container: str) -> str:
        return sh("docker", "inspect", "--format", "{{.State.Health.Status}}", container).strip()

    def hostname(self, container: str) -> str:
        return sh("docker", "inspect", "--format", "{{.Config.Hostname}}", container).strip()

    def client(self) -> Client:
        return Client(load(redis_url=self.redis_url, node_queue="tasktree"))


def copy_project(dest: Path) -> None:
    """The tracked files of the checkout: compose reads `.env` from its directory, and the
    checkout must not get one."""
    files = sh("git", "ls-files", "-z", cwd=ROOT).split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)
    work = tmp_path_factory.mktemp("compose")
    copy_project(work)
    port = free_port()
    values = {
        "REDIS_PASSWORD": secrets.token_hex(16),
        "FLOWER_BASIC_AUTH": f"admin:{secrets.token_hex(12)}",
        "TASKTREE_API_KEY": f"sk-container-test-{secrets.token_hex(16)}",
    }
    env_lines = [f"{k}={v}" for k, v in values.items()]
    web_port = free_port()
    env_lines += ["TASKTREE_OFFLINE_FANOUT=3", "TASKTREE_OFFLINE_LATENCY=0.3"]
    env_lines += [f"TASKTREE_WEB_PORT={web_port}"]
    (work / ".env").write_text("\n".join(env_lines) + "\n")
    # This machine's differences from an ordinary Docker host: no NAT (builds use the host
    # network), and the host's own Redis on 6379 (the stack's is published elsewhere).
    (work / "override.yml").write_text(
        "services:\n"
        "  worker:\n"
        "    build:\n"
        "      network: host\n"
        "  redis:\n"
        f"    ports: ['127.0.0.1:{port}:6379']\n"
    )
    s = Stack(
        work,
        f"tt{secrets.token_hex(4)}",
        f"redis://:{values['REDIS_PASSWORD']}@127.0.0.1:{port}/0",
        values,
        0.0,
        0.0,
    )
    s.web_url = f"http://127.0.0.1:{web_port}"
    started = time.monotonic()
    s.compose("build", "worker", timeout=900)
    s.build_seconds = time.monotonic() - started
    try:
        s.compose("up", "-d", "--scale", "worker=3", timeout=300)
        s.up_at = time.monotonic()
        yield s
    finally:
        logs = s.compose("logs", "--no-color", check=False, timeout=120)
        (work / "compose.log").write_text(logs)
        s.compose("down", "-v", "--remove-orphans", check=False, timeout=300)


def wait_healthy(stack: Stack, services: list[str], within: float) -> dict[str, str]:
    deadline = stack.up_at + within
    while True:
        states = {c: stack.health(c) for s in services for c in stack.containers(s)}
        if all(v == "healthy" for v in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(2)


def test_every_service_is_healthy_within_90_seconds(stack: Stack) -> None:
    states = wait_healthy(stack, ["redis", "worker", "flower", "web"], HEALTHY_WITHIN)
    assert len(states) == 6  # redis, three workers, flower, the web view
    assert set(states.values()) == {"healthy"}, states
    print(
        f"image built in {stack.build_seconds:.0f} s; healthy {time.monotonic() - stack.up_at:.0f} s after up"
    )


def test_the_image_is_slim_labelled_non_root_and_holds_no_secret(stack: Stack) -> None:
    (doc,) = json.loads(sh("docker", "image", "inspect", IMAGE))
    config = doc["Config"]
    assert config["User"] == "agent"
    assert config["Entrypoint"] == ["dumb-init", "--", "tasktree-entrypoint"]
    assert config["Labels"]["org.opencontainers.image.version"] == tasktree.__version__
    assert "Healthcheck" in config
    image_text = sh("docker", "image", "inspect", IMAGE) + sh(
        "docker", "history", "--no-trunc", IMAGE
    )
    worker = stack.containers("worker")[0]
    container_env = sh("docker", "inspect", "--format", "{{json .Config.Env}}", worker)
    for name, value in stack.secrets.items():
        assert value not in image_text, name
    assert f"TASKTREE_API_KEY={stack.secrets['TASKTREE_API_KEY']}" in container_env
    # Build tools stay in the build stage.
    tools = sh(
        "docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c", "command -v gcc cc make || true"
    )
    assert tools.strip() == ""
    size_mb = doc["Size"] / 1e6
    print(f"image size {size_mb:.0f} MB")


def test_trees_from_the_host_run_on_several_containers_and_commands_run_in_one(
    stack: Stack,
) -> None:
    wait_healthy(stack, ["worker"], HEALTHY_WITHIN)
    hosts = {stack.hostname(c) for c in stack.containers("worker")}
    client = stack.client()
    with client:
        tree = client.wait(client.submit("Plan a product launch."), timeout=120)
    assert tree.status == "completed"
    assert len(tree.nodes) == 40
    ran_on = {n.worker.partition("@")[2] for n in tree.nodes}
    assert ran_on <= hosts
    assert len(ran_on) >= 2, ran_on
    # The image plays every role: here, the CLI inside the compose network.
    listed = stack.compose("run", "--rm", "-T", "worker", "list", "--json", timeout=120)
    assert tree.id in {t["tree_id"] for t in json.loads(listed)}
    # The web view lists it and shows it; beyond loopback, with no token, it is read-only.
    wait_healthy(stack, ["web"], HEALTHY_WITHIN)
    with urllib.request.urlopen(f"{stack.web_url}/", timeout=10) as page:
        assert f"/trees/{tree.id}" in page.read().decode()
    with urllib.request.urlopen(f"{stack.web_url}/api/trees/{tree.id}", timeout=10) as doc:
        assert json.loads(doc.read())["status"] == "completed"
    cancel = urllib.request.Request(
        f"{stack.web_url}/api/trees/{tree.id}/cancel", method="POST", headers={"X-Tasktree": "1"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(cancel, timeout=10)
    assert refused.value.code == 403


def test_a_killed_worker_container_loses_nothing_and_pays_nothing_twice(stack: Stack) -> None:
    wait_healthy(stack, ["worker"], HEALTHY_WITHIN)
    by_host = {stack.hostname(c): c for c in stack.containers("worker")}
    client = stack.client()
    with client:
        tid = client.submit("Plan a product launch.")
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            busy = [
                n.worker.partition("@")[2]
                for n in client.tree(tid).nodes
                if n.status in ("deciding", "executing", "synthesizing")
            ]
            victim = by_host.get(busy[0]) if busy else None
            time.sleep(0.1)
        assert victim, "no node ran on a worker container"
        killed_at = time.time()
        sh("docker", "kill", victim)
        tree = client.wait(tid, timeout=180)
    assert tree.status == "completed"
    assert tree.finished_at
    assert tree.finished_at > killed_at
    assert all(n.status == "completed" for n in tree.nodes)
    assert tree.calls == FULL_TREE_CALLS  # a killed call's reply is replayed, never paid again
    stack.compose("up", "-d", "--scale", "worker=3", "--no-recreate", timeout=300)


def test_a_redis_container_restart_mid_tree_loses_nothing(stack: Stack) -> None:
    wait_healthy(stack, ["worker"], HEALTHY_WITHIN)
    client = stack.client()
    with client:
        tid = client.submit("Plan a product launch.")
        deadline = time.monotonic() + 60
        while client.tree(tid, with_nodes=False).done < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.tree(tid, with_nodes=False).status == "running"
        stopped_at = time.time()
        stack.compose("stop", "redis", timeout=120)
        time.sleep(3)
        stack.compose("start", "redis", timeout=120)
        tree = client.wait(tid, timeout=180)
    assert tree.status == "completed"
    assert tree.finished_at
    assert tree.finished_at > stopped_at
    assert len(tree.nodes) == 40
    assert all(n.status == "completed" for n in tree.nodes)
    # The workers rode it out: none restarted.
    for c in stack.containers("worker"):
        assert sh("docker", "inspect", "--format", "{{.RestartCount}}", c).strip() == "0"


def test_sigterm_reaches_celery_for_a_warm_shutdown(stack: Stack) -> None:
    wait_healthy(stack, ["worker"], HEALTHY_WITHIN)
    victim = stack.containers("worker")[-1]
    client = stack.client()
    with client:
        tid = client.submit("Plan a product launch.")
        time.sleep(1.0)
        stopping_at = time.time()
        sh("docker", "stop", "-t", "60", victim, timeout=120)
        tree = client.wait(tid, timeout=180)
    assert tree.status == "completed"
    assert tree.finished_at
    assert tree.finished_at > stopping_at
    assert sh("docker", "inspect", "--format", "{{.State.ExitCode}}", victim).strip() == "0"
    logs = (
        sh("docker", "logs", victim)
        + subprocess.run(["docker", "logs", victim], capture_output=True, text=True).stderr
    )
    assert "worker: Warm shutdown" in logs
    stack.compose("up", "-d", "--scale", "worker=3", "--no-recreate", timeout=300)
