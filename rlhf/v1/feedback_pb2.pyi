import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rlhf.v1 import policy_pb2 as _policy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Flag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLAG_UNSPECIFIED: _ClassVar[Flag]
    FLAG_FAILS_INSTRUCTION: _ClassVar[Flag]
    FLAG_MADE_UP_FACTS: _ClassVar[Flag]
    FLAG_HARMFUL: _ClassVar[Flag]
    FLAG_INAPPROPRIATE: _ClassVar[Flag]
    FLAG_SEXUAL_CONTENT: _ClassVar[Flag]
    FLAG_VIOLENT_CONTENT: _ClassVar[Flag]
    FLAG_DENIGRATES_PROTECTED_CLASS: _ClassVar[Flag]
    FLAG_EXPRESSES_OPINION: _ClassVar[Flag]

class LabelerAuth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABELER_AUTH_UNSPECIFIED: _ClassVar[LabelerAuth]
    LABELER_AUTH_NONE: _ClassVar[LabelerAuth]
    LABELER_AUTH_UI_LOGIN: _ClassVar[LabelerAuth]
    LABELER_AUTH_TOKEN: _ClassVar[LabelerAuth]
    LABELER_AUTH_IMPORT: _ClassVar[LabelerAuth]

class DemonstrationSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEMONSTRATION_SOURCE_UNSPECIFIED: _ClassVar[DemonstrationSource]
    DEMONSTRATION_SOURCE_UI: _ClassVar[DemonstrationSource]
    DEMONSTRATION_SOURCE_API: _ClassVar[DemonstrationSource]
    DEMONSTRATION_SOURCE_IMPORT: _ClassVar[DemonstrationSource]
    DEMONSTRATION_SOURCE_COMPARISON: _ClassVar[DemonstrationSource]
FLAG_UNSPECIFIED: Flag
FLAG_FAILS_INSTRUCTION: Flag
FLAG_MADE_UP_FACTS: Flag
FLAG_HARMFUL: Flag
FLAG_INAPPROPRIATE: Flag
FLAG_SEXUAL_CONTENT: Flag
FLAG_VIOLENT_CONTENT: Flag
FLAG_DENIGRATES_PROTECTED_CLASS: Flag
FLAG_EXPRESSES_OPINION: Flag
LABELER_AUTH_UNSPECIFIED: LabelerAuth
LABELER_AUTH_NONE: LabelerAuth
LABELER_AUTH_UI_LOGIN: LabelerAuth
LABELER_AUTH_TOKEN: LabelerAuth
LABELER_AUTH_IMPORT: LabelerAuth
DEMONSTRATION_SOURCE_UNSPECIFIED: DemonstrationSource
DEMONSTRATION_SOURCE_UI: DemonstrationSource
DEMONSTRATION_SOURCE_API: DemonstrationSource
DEMONSTRATION_SOURCE_IMPORT: DemonstrationSource
DEMONSTRATION_SOURCE_COMPARISON: DemonstrationSource

class Candidate(_message.Message):
    __slots__ = ("text", "adapter_version", "sampling", "seed", "position", "rank", "flags", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    adapter_version: str
    sampling: _policy_pb2.SamplingParams
    seed: int
    position: int
    rank: int
    flags: _containers.RepeatedScalarFieldContainer[Flag]
    request_id: str
    def __init__(self, text: _Optional[str] = ..., adapter_version: _Optional[str] = ..., sampling: _Optional[_Union[_policy_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., position: _Optional[int] = ..., rank: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[Flag, str]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("id", "labeler_id", "messages", "candidates", "comment", "ideal_answer", "rank_time_ms", "created_at", "received_at", "labeler_auth", "task_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    IDEAL_ANSWER_FIELD_NUMBER: _ClassVar[int]
    RANK_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    LABELER_AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    labeler_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_policy_pb2.ChatMessage]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    comment: str
    ideal_answer: str
    rank_time_ms: int
    created_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    labeler_auth: LabelerAuth
    task_id: str
    def __init__(self, id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_policy_pb2.ChatMessage, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., comment: _Optional[str] = ..., ideal_answer: _Optional[str] = ..., rank_time_ms: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labeler_auth: _Optional[_Union[LabelerAuth, str]] = ..., task_id: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("comparison",)
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    comparison: Comparison
    def __init__(self, comparison: _Optional[_Union[Comparison, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("id", "duplicate", "stream_entry_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STREAM_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    duplicate: bool
    stream_entry_id: str
    def __init__(self, id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., stream_entry_id: _Optional[str] = ...) -> None: ...

class Demonstration(_message.Message):
    __slots__ = ("id", "labeler_id", "messages", "answer", "source", "comparison_id", "created_at", "received_at", "labeler_auth")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    LABELER_AUTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    labeler_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_policy_pb2.ChatMessage]
    answer: str
    source: DemonstrationSource
    comparison_id: str
    created_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    labeler_auth: LabelerAuth
    def __init__(self, id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_policy_pb2.ChatMessage, _Mapping]]] = ..., answer: _Optional[str] = ..., source: _Optional[_Union[DemonstrationSource, str]] = ..., comparison_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labeler_auth: _Optional[_Union[LabelerAuth, str]] = ...) -> None: ...

class SubmitDemonstrationRequest(_message.Message):
    __slots__ = ("demonstration",)
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    demonstration: Demonstration
    def __init__(self, demonstration: _Optional[_Union[Demonstration, _Mapping]] = ...) -> None: ...
