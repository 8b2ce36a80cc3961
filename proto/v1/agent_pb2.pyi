from spotwise.proto.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_JOINING: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_ASSIGNED: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_LOST: _ClassVar[NodeState]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_JOINING: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_ASSIGNED: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_LOST: NodeState

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "instance_id", "instance_type", "zone", "lifecycle", "gpus", "slots", "address", "store_port", "price_per_hour", "current_job_id", "current_generation", "log_dir", "provider_node", "node_secret")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    CURRENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_NODE_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    instance_id: str
    instance_type: str
    zone: str
    lifecycle: str
    gpus: int
    slots: int
    address: str
    store_port: int
    price_per_hour: float
    current_job_id: str
    current_generation: int
    log_dir: str
    provider_node: str
    node_secret: str
    def __init__(self, node_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., instance_type: _Optional[str] = ..., zone: _Optional[str] = ..., lifecycle: _Optional[str] = ..., gpus: _Optional[int] = ..., slots: _Optional[int] = ..., address: _Optional[str] = ..., store_port: _Optional[int] = ..., price_per_hour: _Optional[float] = ..., current_job_id: _Optional[str] = ..., current_generation: _Optional[int] = ..., log_dir: _Optional[str] = ..., provider_node: _Optional[str] = ..., node_secret: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s", "lease_s", "node_secret", "beat_port")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    BEAT_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    lease_s: float
    node_secret: str
    beat_port: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., node_secret: _Optional[str] = ..., beat_port: _Optional[int] = ...) -> None: ...

class ProcessStatus(_message.Message):
    __slots__ = ("local_rank", "rank", "pid", "running", "exit_code")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    rank: int
    pid: int
    running: bool
    exit_code: int
    def __init__(self, local_rank: _Optional[int] = ..., rank: _Optional[int] = ..., pid: _Optional[int] = ..., running: _Optional[bool] = ..., exit_code: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "job_id", "generation", "processes", "node_secret", "assignment_version", "seq")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    job_id: str
    generation: int
    processes: _containers.RepeatedCompositeFieldContainer[ProcessStatus]
    node_secret: str
    assignment_version: int
    seq: int
    def __init__(self, node_id: _Optional[str] = ..., job_id: _Optional[str] = ..., generation: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[ProcessStatus, _Mapping]]] = ..., node_secret: _Optional[str] = ..., assignment_version: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job_id", "generation", "spec", "world_size", "node_rank", "num_nodes", "rank_start", "nproc", "master_addr", "master_port", "restore_step", "checkpoint_now", "lost_steps", "cost_usd", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    RANK_START_FIELD_NUMBER: _ClassVar[int]
    NPROC_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    RESTORE_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_NOW_FIELD_NUMBER: _ClassVar[int]
    LOST_STEPS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    spec: _jobs_pb2.JobSpec
    world_size: int
    node_rank: int
    num_nodes: int
    rank_start: int
    nproc: int
    master_addr: str
    master_port: int
    restore_step: int
    checkpoint_now: bool
    lost_steps: int
    cost_usd: float
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., spec: _Optional[_Union[_jobs_pb2.JobSpec, _Mapping]] = ..., world_size: _Optional[int] = ..., node_rank: _Optional[int] = ..., num_nodes: _Optional[int] = ..., rank_start: _Optional[int] = ..., nproc: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., restore_step: _Optional[int] = ..., checkpoint_now: _Optional[bool] = ..., lost_steps: _Optional[int] = ..., cost_usd: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("assignment", "reregister", "assignment_version", "seq")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    reregister: bool
    assignment_version: int
    seq: int
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., reregister: _Optional[bool] = ..., assignment_version: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class ProcessExited(_message.Message):
    __slots__ = ("local_rank", "rank", "exit_code")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    rank: int
    exit_code: int
    def __init__(self, local_rank: _Optional[int] = ..., rank: _Optional[int] = ..., exit_code: _Optional[int] = ...) -> None: ...

class CheckpointCommitted(_message.Message):
    __slots__ = ("step", "path", "bytes", "cursor", "requested")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    bytes: int
    cursor: int
    requested: bool
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ..., cursor: _Optional[int] = ..., requested: _Optional[bool] = ...) -> None: ...

class InterruptionNotice(_message.Message):
    __slots__ = ("action", "deadline")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    action: str
    deadline: float
    def __init__(self, action: _Optional[str] = ..., deadline: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "loss", "samples_per_second", "world_size")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    samples_per_second: float
    world_size: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., world_size: _Optional[int] = ...) -> None: ...

class CheckpointFailed(_message.Message):
    __slots__ = ("step", "reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    reason: str
    def __init__(self, step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Restored(_message.Message):
    __slots__ = ("step", "world_size")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    step: int
    world_size: int
    def __init__(self, step: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class ReportEventRequest(_message.Message):
    __slots__ = ("node_id", "job_id", "generation", "time", "process_exited", "checkpoint_committed", "interruption_notice", "progress", "restored", "checkpoint_failed", "node_secret")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PROCESS_EXITED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTION_NOTICE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILED_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    job_id: str
    generation: int
    time: float
    process_exited: ProcessExited
    checkpoint_committed: CheckpointCommitted
    interruption_notice: InterruptionNotice
    progress: Progress
    restored: Restored
    checkpoint_failed: CheckpointFailed
    node_secret: str
    def __init__(self, node_id: _Optional[str] = ..., job_id: _Optional[str] = ..., generation: _Optional[int] = ..., time: _Optional[float] = ..., process_exited: _Optional[_Union[ProcessExited, _Mapping]] = ..., checkpoint_committed: _Optional[_Union[CheckpointCommitted, _Mapping]] = ..., interruption_notice: _Optional[_Union[InterruptionNotice, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., restored: _Optional[_Union[Restored, _Mapping]] = ..., checkpoint_failed: _Optional[_Union[CheckpointFailed, _Mapping]] = ..., node_secret: _Optional[str] = ...) -> None: ...

class ReportEventResponse(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
