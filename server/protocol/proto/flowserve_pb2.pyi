from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_DENSITY: _ClassVar[Direction]
    DIRECTION_GENERATION: _ClassVar[Direction]
    DIRECTION_ENCODE: _ClassVar[Direction]

class LogLikelihoodKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_LIKELIHOOD_KIND_UNSPECIFIED: _ClassVar[LogLikelihoodKind]
    LOG_LIKELIHOOD_KIND_EXACT: _ClassVar[LogLikelihoodKind]
    LOG_LIKELIHOOD_KIND_LOWER_BOUND: _ClassVar[LogLikelihoodKind]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_DENSITY: Direction
DIRECTION_GENERATION: Direction
DIRECTION_ENCODE: Direction
LOG_LIKELIHOOD_KIND_UNSPECIFIED: LogLikelihoodKind
LOG_LIKELIHOOD_KIND_EXACT: LogLikelihoodKind
LOG_LIKELIHOOD_KIND_LOWER_BOUND: LogLikelihoodKind

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "event_shape", "versions", "directions", "ready", "metadata", "context_shape", "log_likelihood_kind")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    EVENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    event_shape: _containers.RepeatedScalarFieldContainer[int]
    versions: _containers.RepeatedScalarFieldContainer[str]
    directions: _containers.RepeatedScalarFieldContainer[Direction]
    ready: bool
    metadata: _containers.ScalarMap[str, str]
    context_shape: _containers.RepeatedScalarFieldContainer[int]
    log_likelihood_kind: LogLikelihoodKind
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., event_shape: _Optional[_Iterable[int]] = ..., versions: _Optional[_Iterable[str]] = ..., directions: _Optional[_Iterable[_Union[Direction, str]]] = ..., ready: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., context_shape: _Optional[_Iterable[int]] = ..., log_likelihood_kind: _Optional[_Union[LogLikelihoodKind, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "num_samples", "seed", "temperature", "return_log_prob", "context", "samples_per_context", "truncate_to_support", "max_draws")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_TO_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_samples: int
    seed: int
    temperature: float
    return_log_prob: bool
    context: Tensor
    samples_per_context: int
    truncate_to_support: bool
    max_draws: int
    def __init__(self, model: _Optional[str] = ..., num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., return_log_prob: _Optional[bool] = ..., context: _Optional[_Union[Tensor, _Mapping]] = ..., samples_per_context: _Optional[int] = ..., truncate_to_support: _Optional[bool] = ..., max_draws: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("samples", "log_prob", "seed", "first_row", "acceptance_rate", "draws")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROW_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    samples: Tensor
    log_prob: _containers.RepeatedScalarFieldContainer[float]
    seed: int
    first_row: int
    acceptance_rate: float
    draws: int
    def __init__(self, samples: _Optional[_Union[Tensor, _Mapping]] = ..., log_prob: _Optional[_Iterable[float]] = ..., seed: _Optional[int] = ..., first_row: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., draws: _Optional[int] = ...) -> None: ...

class LogLikelihoodRequest(_message.Message):
    __slots__ = ("model", "x", "context", "return_bits_per_dim", "truncate_to_support")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_TO_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    model: str
    x: Tensor
    context: Tensor
    return_bits_per_dim: bool
    truncate_to_support: bool
    def __init__(self, model: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., context: _Optional[_Union[Tensor, _Mapping]] = ..., return_bits_per_dim: _Optional[bool] = ..., truncate_to_support: _Optional[bool] = ...) -> None: ...

class LogLikelihoodResponse(_message.Message):
    __slots__ = ("log_prob", "bits_per_dim")
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    log_prob: _containers.RepeatedScalarFieldContainer[float]
    bits_per_dim: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, log_prob: _Optional[_Iterable[float]] = ..., bits_per_dim: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "x", "context")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    x: Tensor
    context: Tensor
    def __init__(self, model: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., context: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("z", "log_det", "log_prob")
    Z_FIELD_NUMBER: _ClassVar[int]
    LOG_DET_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    z: Tensor
    log_det: _containers.RepeatedScalarFieldContainer[float]
    log_prob: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, z: _Optional[_Union[Tensor, _Mapping]] = ..., log_det: _Optional[_Iterable[float]] = ..., log_prob: _Optional[_Iterable[float]] = ...) -> None: ...
