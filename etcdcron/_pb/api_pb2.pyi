from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TriggerResponseResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUCCESS: _ClassVar[TriggerResponseResult]
    FAILED: _ClassVar[TriggerResponseResult]
    UNDELIVERABLE: _ClassVar[TriggerResponseResult]
SUCCESS: TriggerResponseResult
FAILED: TriggerResponseResult
UNDELIVERABLE: TriggerResponseResult

class Job(_message.Message):
    __slots__ = ("schedule", "due_time", "ttl", "repeats", "metadata", "payload", "failure_policy", "catch_up_window", "coalesce", "trigger_timeout")
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    DUE_TIME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    FAILURE_POLICY_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_WINDOW_FIELD_NUMBER: _ClassVar[int]
    COALESCE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    schedule: str
    due_time: str
    ttl: str
    repeats: int
    metadata: _any_pb2.Any
    payload: _any_pb2.Any
    failure_policy: FailurePolicy
    catch_up_window: str
    coalesce: bool
    trigger_timeout: str
    def __init__(self, schedule: _Optional[str] = ..., due_time: _Optional[str] = ..., ttl: _Optional[str] = ..., repeats: _Optional[int] = ..., metadata: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., failure_policy: _Optional[_Union[FailurePolicy, _Mapping]] = ..., catch_up_window: _Optional[str] = ..., coalesce: bool = ..., trigger_timeout: _Optional[str] = ...) -> None: ...

class FailurePolicy(_message.Message):
    __slots__ = ("drop", "constant")
    DROP_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    drop: FailurePolicyDrop
    constant: FailurePolicyConstant
    def __init__(self, drop: _Optional[_Union[FailurePolicyDrop, _Mapping]] = ..., constant: _Optional[_Union[FailurePolicyConstant, _Mapping]] = ...) -> None: ...

class FailurePolicyDrop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FailurePolicyConstant(_message.Message):
    __slots__ = ("interval", "max_retries")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    max_retries: int
    def __init__(self, interval: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., max_retries: _Optional[int] = ...) -> None: ...

class TriggerRequest(_message.Message):
    __slots__ = ("name", "metadata", "payload")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    metadata: _any_pb2.Any
    payload: _any_pb2.Any
    def __init__(self, name: _Optional[str] = ..., metadata: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class TriggerResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: TriggerResponseResult
    def __init__(self, result: _Optional[_Union[TriggerResponseResult, str]] = ...) -> None: ...

class NamedJob(_message.Message):
    __slots__ = ("name", "job")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    name: str
    job: Job
    def __init__(self, name: _Optional[str] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[NamedJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[NamedJob, _Mapping]]] = ...) -> None: ...

class InformerEvent(_message.Message):
    __slots__ = ("put", "delete", "drop_all")
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    DROP_ALL_FIELD_NUMBER: _ClassVar[int]
    put: InformerEventJobPut
    delete: InformerEventJobDelete
    drop_all: InformerEventDropAll
    def __init__(self, put: _Optional[_Union[InformerEventJobPut, _Mapping]] = ..., delete: _Optional[_Union[InformerEventJobDelete, _Mapping]] = ..., drop_all: _Optional[_Union[InformerEventDropAll, _Mapping]] = ...) -> None: ...

class InformerEventJobPut(_message.Message):
    __slots__ = ("name", "mod_revision", "metadata", "payload")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    mod_revision: int
    metadata: _any_pb2.Any
    payload: _any_pb2.Any
    def __init__(self, name: _Optional[str] = ..., mod_revision: _Optional[int] = ..., metadata: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class InformerEventJobDelete(_message.Message):
    __slots__ = ("mod_revision", "name")
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    mod_revision: int
    name: str
    def __init__(self, mod_revision: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class InformerEventDropAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
