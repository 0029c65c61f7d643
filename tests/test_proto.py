"""Wire compatibility: bytes from the original GenericAgent contract decode with agent.proto."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tasktree.errors import PayloadError
from tasktree.proto import SubTaskRequest, TaskRequest, TaskResult, from_dict, to_dict

ORIGINAL = """syntax = "proto3";
package original;
message SubTaskRequest { string requested_persona = 1; string task_details = 2; }
message TaskRequest { string task_id = 1; string persona_prompt = 2; string task_instructions = 3; map<string, string> context_data = 4; }
message TaskResult { string task_id = 1; string final_content = 2; bool success = 3; string error_message = 4; repeated SubTaskRequest sub_tasks = 5; }
service GenericAgent { rpc ExecuteTask(TaskRequest) returns (TaskResult) {} }
"""


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory):
    """The original contract, compiled by protoc into a module of its own."""
    d = tmp_path_factory.mktemp("orig")
    (d / "original_contract.proto").write_text(ORIGINAL)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{d}",
            f"--python_out={d}",
            str(d / "original_contract.proto"),
        ],
        check=True,
    )
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("original_contract_pb2")
    finally:
        sys.path.remove(str(d))


def test_original_request_decodes_with_ours(original) -> None:
    theirs = original.TaskRequest(
        task_id="t1",
        persona_prompt="You are X.",
        task_instructions="Do Y.",
        context_data={"a": "1", "b": "2"},
    )
    ours = TaskRequest.FromString(theirs.SerializeToString())
    assert (ours.task_id, ours.persona_prompt, ours.task_instructions) == (
        "t1",
        "You are X.",
        "Do Y.",
    )
    assert dict(ours.context_data) == {"a": "1", "b": "2"}


def test_our_request_decodes_with_original(original) -> None:
    ours = TaskRequest(
        task_id="t2",
        persona_prompt="P",
        task_instructions="I",
        context_data={"k": "v"},
        tree_id="abc",
        node_id="0.1",
        depth=1,
    )
    theirs = original.TaskRequest.FromString(ours.SerializeToString())
    assert (theirs.task_id, theirs.persona_prompt, theirs.task_instructions) == ("t2", "P", "I")
    assert dict(theirs.context_data) == {"k": "v"}


def test_results_with_sub_tasks_round_trip_both_ways(original) -> None:
    theirs = original.TaskResult(
        task_id="t",
        final_content="c",
        success=True,
        error_message="",
        sub_tasks=[original.SubTaskRequest(requested_persona="p", task_details="d")],
    )
    ours = TaskResult.FromString(theirs.SerializeToString())
    assert ours.sub_tasks[0] == SubTaskRequest(requested_persona="p", task_details="d")
    assert ours.success
    back = original.TaskResult.FromString(
        TaskResult(
            task_id="x", success=False, error_message="e", status="failed"
        ).SerializeToString()
    )
    assert (back.task_id, back.success, back.error_message) == ("x", False, "e")


def test_field_numbers_match_the_contract(original) -> None:
    for name in ("SubTaskRequest", "TaskRequest", "TaskResult"):
        theirs = {f.name: (f.number, f.type) for f in getattr(original, name).DESCRIPTOR.fields}
        ours = {f.name: (f.number, f.type) for f in globals()[name].DESCRIPTOR.fields}
        assert theirs.items() <= ours.items(), name


def test_service_path_is_unchanged() -> None:
    from tasktree.proto import agent_pb2

    assert agent_pb2.DESCRIPTOR.services_by_name["GenericAgent"].full_name == "GenericAgent"


def test_json_form_round_trips_and_rejects_bad_messages() -> None:
    req = TaskRequest(
        task_id="a", persona_prompt="p", task_instructions="i", tree_id="t", node_id="0", depth=2
    )
    assert from_dict(TaskRequest, to_dict(req)) == req
    for bad in (None, [], "x", {"depth": "deep"}, {"unknown_field": 1}, {"task_id": 5}):
        with pytest.raises(PayloadError):
            from_dict(TaskRequest, bad)


def test_shipped_module_is_generated_from_shipped_proto(tmp_path: Path) -> None:
    proto_dir = Path(__file__).resolve().parent.parent / "tasktree" / "proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={tmp_path}",
            str(proto_dir / "agent.proto"),
        ],
        check=True,
    )
    fresh = (tmp_path / "agent_pb2.py").read_text()
    assert fresh == (proto_dir / "agent_pb2.py").read_text(), "run `make proto`"
