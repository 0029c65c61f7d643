from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubTaskRequest(_message.Message):
    __slots__ = ("requested_persona", "task_details", "depends_on", "weight")
    REQUESTED_PERSONA_FIELD_NUMBER: _ClassVar[int]
    TASK_DETAILS_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    requested_persona: str
    task_details: str
    depends_on: _containers.RepeatedScalarFieldContainer[int]
    weight: float
    def __init__(self, requested_persona: _Optional[str] = ..., task_details: _Optional[str] = ..., depends_on: _Optional[_Iterable[int]] = ..., weight: _Optional[float] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("task_id", "persona_prompt", "task_instructions", "context_data", "tree_id", "node_id", "depth")
    class ContextDataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONA_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_DATA_FIELD_NUMBER: _ClassVar[int]
    TREE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    persona_prompt: str
    task_instructions: str
    context_data: _containers.ScalarMap[str, str]
    tree_id: str
    node_id: str
    depth: int
    def __init__(self, task_id: _Optional[str] = ..., persona_prompt: _Optional[str] = ..., task_instructions: _Optional[str] = ..., context_data: _Optional[_Mapping[str, str]] = ..., tree_id: _Optional[str] = ..., node_id: _Optional[str] = ..., depth: _Optional[int] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "final_content", "success", "error_message", "sub_tasks", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_CONTENT_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUB_TASKS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    final_content: str
    success: bool
    error_message: str
    sub_tasks: _containers.RepeatedCompositeFieldContainer[SubTaskRequest]
    status: str
    def __init__(self, task_id: _Optional[str] = ..., final_content: _Optional[str] = ..., success: _Optional[bool] = ..., error_message: _Optional[str] = ..., sub_tasks: _Optional[_Iterable[_Union[SubTaskRequest, _Mapping]]] = ..., status: _Optional[str] = ...) -> None: ...
