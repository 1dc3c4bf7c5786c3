from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from etcdcron._pb import api_pb2 as _api_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Job(_message.Message):
    __slots__ = ("partition_id", "start", "due_time", "expiration", "job", "paused", "resumed")
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    DUE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    partition_id: int
    start: _timestamp_pb2.Timestamp
    due_time: _timestamp_pb2.Timestamp
    expiration: _timestamp_pb2.Timestamp
    job: _api_pb2.Job
    paused: bool
    resumed: _timestamp_pb2.Timestamp
    def __init__(self, partition_id: _Optional[int] = ..., start: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., due_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expiration: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., job: _Optional[_Union[_api_pb2.Job, _Mapping]] = ..., paused: bool = ..., resumed: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Counter(_message.Message):
    __slots__ = ("job_partition_id", "count", "last_trigger", "attempts", "skipped", "last_skipped")
    JOB_PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_TRIGGER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    job_partition_id: int
    count: int
    last_trigger: _timestamp_pb2.Timestamp
    attempts: int
    skipped: int
    last_skipped: _timestamp_pb2.Timestamp
    def __init__(self, job_partition_id: _Optional[int] = ..., count: _Optional[int] = ..., last_trigger: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., skipped: _Optional[int] = ..., last_skipped: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Leadership(_message.Message):
    __slots__ = ("total", "uid", "replica_data")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_DATA_FIELD_NUMBER: _ClassVar[int]
    total: int
    uid: int
    replica_data: _any_pb2.Any
    def __init__(self, total: _Optional[int] = ..., uid: _Optional[int] = ..., replica_data: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class InFlight(_message.Message):
    __slots__ = ("job_partition_id", "tick")
    JOB_PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    job_partition_id: int
    tick: _timestamp_pb2.Timestamp
    def __init__(self, job_partition_id: _Optional[int] = ..., tick: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
