"""LangGraph's fan-out with Send, recursive by nested compiled graphs (in-process, asyncio)."""

from __future__ import annotations

import asyncio
import operator
import time
from typing import Annotated, Any, TypedDict

from bench.shapes import Spec


class State(TypedDict):
    path: str
    results: Annotated[list[str], operator.add]


def build(spec: Spec, depth: int = 0) -> Any:
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    g = StateGraph(State)
    if depth >= spec.depth:

        async def execute(state: State) -> dict[str, Any]:
            await asyncio.sleep(spec.lat(state["path"], "execute"))
            return {"results": [state["path"]]}

        g.add_node("execute", execute)
        g.add_edge(START, "execute")
        g.add_edge("execute", END)
        return g.compile()
    child = build(spec, depth + 1)

    async def decide(state: State) -> dict[str, Any]:
        await asyncio.sleep(spec.lat(state["path"], "decide"))
        return {}

    def fan_out(state: State) -> list[Any]:
        return [
            Send("child", {"path": f"{state['path']}.{i}", "results": []})
            for i in range(1, spec.fanout + 1)
        ]

    async def run_child(state: State) -> dict[str, Any]:
        await child.ainvoke({"path": state["path"], "results": []})
        return {"results": [state["path"]]}

    async def synthesize(state: State) -> dict[str, Any]:
        await asyncio.sleep(spec.lat(state.get("path", "0"), "synthesize"))
        return {}

    g.add_node("decide", decide)
    g.add_node("child", run_child)
    g.add_node("synthesize", synthesize)
    g.add_edge(START, "decide")
    g.add_conditional_edges("decide", fan_out, ["child"])
    g.add_edge("child", "synthesize")
    g.add_edge("synthesize", END)
    return g.compile()


def run(spec: Spec) -> float:
    graph = build(spec)
    start = time.perf_counter()
    asyncio.run(graph.ainvoke({"path": "0", "results": []}, {"recursion_limit": 1000}))
    return time.perf_counter() - start
