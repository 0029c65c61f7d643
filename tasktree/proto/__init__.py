"""agent.proto, its generated module, and JSON conversion for Celery messages."""

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from tasktree.errors import PayloadError
from tasktree.proto.agent_pb2 import SubTaskRequest, TaskRequest, TaskResult

__all__ = ["SubTaskRequest", "TaskRequest", "TaskResult", "from_dict", "to_dict"]

M = TypeVar("M", bound=Message)


def to_dict(message: Message) -> dict[str, Any]:
    """The JSON form a Celery message carries (proto field names, defaults included)."""
    doc: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return doc


def from_dict(cls: type[M], data: Any) -> M:
    """Decode and validate a JSON-form message; any mismatch raises PayloadError."""
    if not isinstance(data, dict):
        raise PayloadError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    try:
        parsed: M = json_format.ParseDict(data, cls())
        return parsed
    except (json_format.ParseError, TypeError, ValueError) as e:
        raise PayloadError(f"invalid {cls.__name__}: {e}") from None
