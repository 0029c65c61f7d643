"""The worker image and compose file, checked as far as can be done without a Docker engine
(tests/test_containers.py builds and runs them on a real one), and many workers routed by
queue."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tasktree.models import TreeSpec
from tasktree.settings import Settings
from tests.helpers import ROOT

DOCKERFILE = ROOT / "agent_image" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> the argument strings, with line continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            out.setdefault(op, []).append(rest.strip())
    return out


def test_compose_services_images_and_volumes(compose) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "worker", "flower", "web"}
    redis = services["redis"]
    assert redis["image"] == "${REDIS_IMAGE:-redis:7}"  # a mirror's, or the official image
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd
    assert "--requirepass" in cmd
    assert "--maxmemory-policy noeviction" in cmd
    volume = redis["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    worker = services["worker"]
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]) == DOCKERFILE
    assert worker["env_file"] == ".env"
    assert services["flower"]["image"] == worker["image"]
    assert services["flower"]["command"][0] == "flower"  # the image's role argument
    assert "/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])  # its own
    assert worker["build"]["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11-slim}"
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])  # localhost only
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    web = services["web"]
    assert web["image"] == worker["image"]
    assert web["command"][0] == "serve"  # the image's tasktree role
    assert all(p.startswith("127.0.0.1:") for p in web["ports"])  # localhost only
    assert "TASKTREE_WEB_TOKEN" in web["environment"]  # actions beyond loopback need it
    assert "healthcheck" in web


def test_every_setting_named_is_one_the_code_reads(compose) -> None:
    named = set()
    for service in compose["services"].values():
        named |= set((service.get("environment") or {}).keys())
    example = (ROOT / ".env.example").read_text()
    named |= {
        line.split("=")[0] for line in example.splitlines() if line and not line.startswith("#")
    }
    named |= {
        w for line in dockerfile().get("ENV", []) for w in re.findall(r"(TASKTREE_\w+)=", line)
    }
    fields = {f"TASKTREE_{name.upper()}" for name in Settings.model_fields}
    ours = {n for n in named if n.startswith("TASKTREE_")}
    assert ours
    assert ours <= fields, ours - fields
    others = named - ours
    assert others <= {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "OPENAI_API_KEY"}, others


def test_no_secrets_in_the_image_or_the_repository() -> None:
    env_lines = " ".join(dockerfile().get("ENV", []))
    assert not re.search(r"(KEY|PASSWORD|SECRET|TOKEN)\w*=", env_lines)
    assert not (ROOT / ".env").exists()
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_dockerfile_installs_from_pyproject_as_non_root() -> None:
    d = dockerfile()
    assert d["ARG"][0] == "PYTHON_IMAGE=python:3.11-slim"
    assert d["FROM"] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    copied = " ".join(d["COPY"])
    assert "pyproject.toml" in copied
    assert "requirements" not in DOCKERFILE.read_text()
    assert any('pip install ".[image,otel]"' in line for line in d["RUN"])  # traces work
    assert "--from=build /opt/tasktree /opt/tasktree" in copied  # only the virtualenv
    assert d["USER"] == ["agent"]
    assert "useradd" in " ".join(d["RUN"])
    assert json.loads(d["ENTRYPOINT"][0]) == ["dumb-init", "--", "tasktree-entrypoint"]
    assert "inspect ping" in d["HEALTHCHECK"][0]
    assert d["STOPSIGNAL"] == ["SIGTERM"]
    for path in re.findall(r"COPY (?!--)(\S+)", copied):
        assert (ROOT / path).exists(), path


@pytest.mark.slow
def test_worker_runs_as_the_image_entry_point_from_a_fresh_venv(
    env, client, tmp_path: Path
) -> None:
    """Install a copy of the project the way the Dockerfile does (pip install .) into a fresh
    venv, then run its ENTRYPOINT + CMD from outside the source tree, its health check, and a
    warm stop. The dependencies come from the dev venv (`make` resolves them from the same
    pyproject.toml on every run), so this checks what only it can: the installed package."""
    src = tmp_path / "app"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "celeryconfig.py"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for pkg in ("tasktree", "workers"):
        subprocess.run(["cp", "-r", str(ROOT / pkg), str(src / pkg)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "."],
        cwd=src,
        check=True,
        timeout=600,
    )
    # The console script pip writes when it installs celery, for this venv's interpreter.
    script = venv / "bin" / "celery"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom celery.__main__ import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    d = dockerfile()
    # The entry point script with the image's CMD (dumb-init, PID 1 in the image, left out).
    entry = ["sh", str(ROOT / "agent_image" / "entrypoint.sh"), *json.loads(d["CMD"][0])]
    home = tmp_path / "home"
    home.mkdir()
    wenv = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        **env,
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
    }
    for line in d["ENV"]:
        for k, v in re.findall(r"(\w+)=(\S+)", line):
            if k != "PATH":
                wenv.setdefault(k, v)
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        entry, cwd=home, env=wenv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        tree = client.wait(
            client.submit(TreeSpec.build(client.settings, "Ship it. This includes a, b, c."))
        )
        assert tree.status == "completed"
        host = socket.gethostname()
        assert {n.worker for n in tree.nodes} == {f"agent@{host}"}
        health = (
            d["HEALTHCHECK"][0]
            .split("CMD ", 1)[1]
            .replace("$(hostname)", host)
            .replace(" || exit 1", "")
        )
        ping = subprocess.run(
            shlex.split(health), cwd=home, env=wenv, capture_output=True, text=True, timeout=60
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "pong" in ping.stdout, ping.stdout
        os.killpg(proc.pid, signal.SIGTERM)  # STOPSIGNAL: a warm shutdown
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "warm shutdown" in (tmp_path / "worker.log").read_text().lower()
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import workers; print(workers.__file__)"],
        cwd=home,
        capture_output=True,
        text=True,
    )
    assert str(venv) in installed.stdout  # the installed package, not the source tree


def test_synthesis_runs_only_on_the_synthesis_queue_workers(env, client, start_workers) -> None:
    node_q, synth_q = env["TASKTREE_NODE_QUEUE"], env["TASKTREE_SYNTH_QUEUE"]
    extra = {"TASKTREE_OFFLINE_FANOUT": "3", "TASKTREE_OFFLINE_LATENCY": "0.05"}
    start_workers(2, extra_env=extra, args=["-Q", node_q], names=["agent1@%h", "agent2@%h"])
    start_workers(1, extra_env=extra, args=["-Q", synth_q], names=["agent3@%h"])
    tid = client.submit(TreeSpec.build(client.settings, "Route me.", max_depth=2))
    tree = client.wait(tid)
    assert tree.status == "completed"
    assert len(tree.nodes) == 13
    host = socket.gethostname()
    names = {f"agent{i}@{host}" for i in (1, 2, 3)}
    assert {n.worker for n in tree.nodes} <= names
    events = [e for _, e in client.store.events(tid)]
    synth = {e["worker"] for e in events if e.get("status") == "synthesizing"}
    other = {e["worker"] for e in events if e.get("status") in ("deciding", "executing")}
    assert synth == {f"agent3@{host}"}
    assert len([e for e in events if e.get("status") == "synthesizing"]) == 4
    assert other == {f"agent1@{host}", f"agent2@{host}"}
