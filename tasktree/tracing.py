"""OpenTelemetry traces: every tree is one trace.

- a span per node, `invoke_agent` (GenAI semantic conventions), from the node's start to its
  close, sent by the run that closes it;
- under it a span per task run of the node (`tasktree.node`, `tasktree.synthesize`);
- under that a span per model call (`chat`), with the model and the usage.

Trace and node span ids are derived from the tree and node ids, so a run on any host or
process, or a message the sweeper re-sent, links to the right parent without carrying a
context. On when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) or OTEL_TRACES_EXPORTER
is set, exporting OTLP over HTTP/protobuf as the SDK does, or to the console with
OTEL_TRACES_EXPORTER=console; off otherwise, and then the SDK is never imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from tasktree.models import Node, Reply

log = logging.getLogger(__name__)

PERSONA_CHARS = 60  # of a persona, as the agent's name


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard OTel environment asks for traces."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return bool(endpoint or exporter)


def trace_id(tree_id: str) -> int:
    """A tree's trace id: 128 bits of a hash of its id (never 0)."""
    return int.from_bytes(hashlib.sha256(f"tasktree:{tree_id}".encode()).digest()[:16]) or 1


def span_id(tree_id: str, node_id: str) -> int:
    """A node's span id: 64 bits of a hash of its tree's and its own id (never 0)."""
    digest = hashlib.sha256(f"tasktree:{tree_id}/{node_id}".encode()).digest()
    return int.from_bytes(digest[:8]) or 1


class Tracing:
    """No traces: every method does nothing (the default)."""

    @contextlib.contextmanager
    def run(self, tree_id: str, node_id: str, kind: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def call(self, step: str, model: str) -> Iterator[dict[str, Any]]:
        yield {}

    def node(self, tree_id: str, node: Node) -> None:
        pass

    def flush(self) -> None:
        pass


OFF = Tracing()


def setup(service: str) -> Tracing:
    """Traces as the environment asks (OFF when it does not)."""
    if not wanted():
        return OFF
    try:
        return _On(service)
    except ImportError as e:
        log.warning("OTEL_* asks for traces, but %s: pip install 'tasktree[otel]'", e)
        return OFF


class _On(Tracing):
    def __init__(self, service: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        class Forced(RandomIdGenerator):
            """Random ids, except the ones a node span is given (derived, see above)."""

            def __init__(self) -> None:
                self.next = threading.local()

            def generate_span_id(self) -> int:
                forced: int | None = getattr(self.next, "span", None)
                return forced if forced is not None else super().generate_span_id()

            def generate_trace_id(self) -> int:
                forced: int | None = getattr(self.next, "trace", None)
                return forced if forced is not None else super().generate_trace_id()

        name = os.environ.get("OTEL_SERVICE_NAME") or service
        self.ids = Forced()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": name}), id_generator=self.ids
        )
        exporter: Any
        if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tasktree")
        log.info("OpenTelemetry traces on (service %s)", name)

    def _node_context(self, tree_id: str, node_id: str) -> Any:
        """The context whose parent is a node's span (wherever it is sent from)."""
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        ctx = SpanContext(
            trace_id(tree_id), span_id(tree_id, node_id), True, TraceFlags(TraceFlags.SAMPLED)
        )
        return trace.set_span_in_context(NonRecordingSpan(ctx))

    @contextlib.contextmanager
    def run(self, tree_id: str, node_id: str, kind: str) -> Iterator[None]:
        attributes = {"tasktree.tree_id": tree_id, "tasktree.node_id": node_id}
        with self.tracer.start_as_current_span(
            f"tasktree.{kind}", context=self._node_context(tree_id, node_id), attributes=attributes
        ):
            yield

    @contextlib.contextmanager
    def call(self, step: str, model: str) -> Iterator[dict[str, Any]]:
        """A model call's span; the caller puts the reply in the dict it is given."""
        from opentelemetry.trace import StatusCode

        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "tasktree.step": step,
        }
        with self.tracer.start_as_current_span(
            f"chat {model}", attributes=attributes, record_exception=False
        ) as span:
            out: dict[str, Any] = {}
            try:
                yield out
            except Exception as e:
                span.set_status(StatusCode.ERROR, f"{type(e).__name__}: {e}"[:500])
                raise
            reply: Reply | None = out.get("reply")
            if reply is not None:
                span.set_attributes(
                    {
                        "gen_ai.response.model": reply.model,
                        "gen_ai.usage.input_tokens": reply.prompt_tokens,
                        "gen_ai.usage.output_tokens": reply.completion_tokens,
                        "tasktree.cost_usd": reply.cost_usd,
                    }
                )

    def node(self, tree_id: str, node: Node) -> None:
        """The node's own span, once it closed: from its start (or creation) to its close."""
        from opentelemetry.trace import SpanKind, StatusCode

        persona = " ".join(node.persona.split())[:PERSONA_CHARS]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": persona,
            "gen_ai.request.model": node.model,
            "gen_ai.usage.input_tokens": node.prompt_tokens,
            "gen_ai.usage.output_tokens": node.completion_tokens,
            "tasktree.tree_id": tree_id,
            "tasktree.node_id": node.id,
            "tasktree.depth": node.depth,
            "tasktree.decision": node.decision,
            "tasktree.status": str(node.status),
            "tasktree.calls": node.calls,
            "tasktree.cost_usd": node.cost_usd,
        }
        if node.parent_id:
            context = self._node_context(tree_id, node.parent_id)
            attributes["tasktree.parent_id"] = node.parent_id
        else:
            from opentelemetry.context import Context

            context = Context()  # the root of the trace
        start = node.started_at or node.created_at
        self.ids.next.trace, self.ids.next.span = trace_id(tree_id), span_id(tree_id, node.id)
        try:
            span = self.tracer.start_span(
                f"invoke_agent {persona}",
                context=context,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                start_time=int(start * 1e9),
            )
        finally:
            self.ids.next.trace = self.ids.next.span = None
        if node.error:
            span.set_status(StatusCode.ERROR, node.error[:500])
        span.end(end_time=int((node.finished_at or start) * 1e9))

    def flush(self) -> None:
        """Send what is still batched (a worker stopping; the process may leave at once)."""
        self.provider.force_flush(5_000)
