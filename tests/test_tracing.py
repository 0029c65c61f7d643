"""OpenTelemetry traces, received by a real OTLP/HTTP receiver on 127.0.0.1 (decoded with
opentelemetry-proto) from real worker processes: one trace per tree, one `invoke_agent`
span per node, every edge of the tree, the usage the store recorded."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tasktree.client import Client
from tasktree.models import TreeSpec
from tasktree.tracing import span_id, trace_id, wanted


class Receiver:
    """An OTLP/HTTP (protobuf) trace receiver: every span it was sent, as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        received = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            received.append(decode(span, service["service.name"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, prefix: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"].startswith(prefix)]


def decode(span: Any, service: str) -> dict[str, Any]:
    attrs = {}
    for a in span.attributes:
        v = a.value
        attrs[a.key] = getattr(v, v.WhichOneof("value"))
    return {
        "name": span.name,
        "trace": int.from_bytes(span.trace_id),
        "span": int.from_bytes(span.span_id),
        "parent": int.from_bytes(span.parent_span_id) if span.parent_span_id else 0,
        "start": span.start_time_unix_nano,
        "end": span.end_time_unix_nano,
        "attrs": attrs,
        "service": service,
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.server.shutdown()


def test_traces_are_off_without_the_otel_environment() -> None:
    assert not wanted({})
    assert not wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})
    assert wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert wanted({"OTEL_TRACES_EXPORTER": "otlp"})


def test_tasktree_does_not_load_the_tracing_sdk_when_traces_are_off() -> None:
    """(redis-py itself imports an installed SDK's metrics; the `otel` extra is optional.)"""
    import subprocess
    import sys

    code = (
        "import sys, tasktree.cli, tasktree.runner, workers, tasktree.tracing as t;"
        "assert t.setup('x') is t.OFF;"
        "print(sorted(m for m in sys.modules if m.startswith("
        "('opentelemetry.sdk.trace', 'opentelemetry.exporter'))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_every_tree_is_one_trace_with_a_span_per_node_across_workers(
    client: Client, receiver: Receiver, start_workers: Callable[..., object]
) -> None:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "tasktree-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "TASKTREE_OFFLINE_FANOUT": "3",
    }
    start_workers(2, otel)  # two processes: parents and children run apart
    with client:
        spec = TreeSpec.build(client.settings, "Plan a launch.", max_depth=2)
        trees = [client.wait(client.submit(spec)) for _ in range(2)]
    deadline = time.monotonic() + 30
    want = sum(len(t.nodes) for t in trees)
    while len(receiver.named("invoke_agent")) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    for tree in trees:
        spans = [s for s in receiver.spans if s["trace"] == trace_id(tree.id)]
        agents = {
            s["attrs"]["tasktree.node_id"]: s for s in spans if s["name"].startswith("invoke_agent")
        }
        assert sorted(agents) == sorted(n.id for n in tree.nodes)  # one per node,
        assert len([s for s in spans if s["name"].startswith("invoke_agent")]) == len(
            agents
        )  # once
        assert {s["service"] for s in spans} == {"tasktree-test"}
        workers = {n.worker for n in tree.nodes}
        assert len(workers) == 2  # the tree ran on both processes, and its edges still hold
        for node in tree.nodes:
            span = agents[node.id]
            assert span["span"] == span_id(tree.id, node.id)
            parent = span_id(tree.id, node.parent_id) if node.parent_id else 0
            assert span["parent"] == parent
            a = span["attrs"]
            assert a["gen_ai.operation.name"] == "invoke_agent"
            assert a["gen_ai.agent.name"] == " ".join(node.persona.split())[:60]
            assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
                node.prompt_tokens,
                node.completion_tokens,
            )
            assert a["gen_ai.request.model"] == node.model
            assert (a["tasktree.tree_id"], a["tasktree.depth"]) == (tree.id, node.depth)
            assert a["tasktree.decision"] == node.decision
            assert a["tasktree.cost_usd"] == pytest.approx(node.cost_usd)
            assert span["start"] <= span["end"]
        # Each task run is a span under its node's span; each model call one under a run.
        runs = {s["span"]: s for s in spans if s["name"].startswith("tasktree.")}
        by_id = {s["span"]: s for s in spans}
        for run in runs.values():
            assert (
                by_id[run["parent"]]["attrs"]["tasktree.node_id"]
                == run["attrs"]["tasktree.node_id"]
            )
        synth = [r for r in runs.values() if r["name"] == "tasktree.synthesize"]
        assert {r["attrs"]["tasktree.node_id"] for r in synth} == {
            n.id for n in tree.nodes if n.children
        }
        calls = [s for s in spans if s["name"].startswith("chat ")]
        assert len(calls) == tree.calls
        assert all(c["parent"] in runs for c in calls)
        assert sum(c["attrs"]["gen_ai.usage.input_tokens"] for c in calls) == tree.prompt_tokens
        assert (
            sum(c["attrs"]["gen_ai.usage.output_tokens"] for c in calls) == tree.completion_tokens
        )
