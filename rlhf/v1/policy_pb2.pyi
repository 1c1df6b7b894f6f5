from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_MAX_TOKENS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_MAX_TOKENS: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CONTEXT: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("content", "role")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: str | None = ..., content: str | None = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "seed", "stop", "temperature", "top_k", "top_p")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_new_tokens: int | None = ..., temperature: float | None = ..., top_p: float | None = ..., top_k: int | None = ..., seed: int | None = ..., stop: _Iterable[str] | None = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("adapter_version", "messages", "n", "prompt", "request_id", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt: str
    sampling: SamplingParams
    n: int
    adapter_version: str
    def __init__(self, request_id: str | None = ..., messages: _Iterable[ChatMessage | _Mapping] | None = ..., prompt: str | None = ..., sampling: SamplingParams | _Mapping | None = ..., n: int | None = ..., adapter_version: str | None = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("adapter_version", "completion_tokens", "finish_reason", "index", "prompt_tokens", "request_id", "seed", "text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str
    seed: int
    def __init__(self, request_id: str | None = ..., index: int | None = ..., text: str | None = ..., finish_reason: FinishReason | str | None = ..., prompt_tokens: int | None = ..., completion_tokens: int | None = ..., adapter_version: str | None = ..., seed: int | None = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("base_model", "context_length", "current_adapter_version", "default_max_new_tokens", "loaded_adapter_versions", "max_batch_size", "max_n", "max_new_tokens", "max_queue", "server_version")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_ADAPTER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    current_adapter_version: str
    loaded_adapter_versions: _containers.RepeatedScalarFieldContainer[str]
    max_n: int
    max_new_tokens: int
    default_max_new_tokens: int
    context_length: int
    max_batch_size: int
    max_queue: int
    server_version: str
    def __init__(self, base_model: str | None = ..., current_adapter_version: str | None = ..., loaded_adapter_versions: _Iterable[str] | None = ..., max_n: int | None = ..., max_new_tokens: int | None = ..., default_max_new_tokens: int | None = ..., context_length: int | None = ..., max_batch_size: int | None = ..., max_queue: int | None = ..., server_version: str | None = ...) -> None: ...
