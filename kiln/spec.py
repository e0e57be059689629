"""Typed specs of Kiln's two resources: frozen dataclasses parsed from the CRD-defaulted spec.

Why this shape: the CRD schema (`scripts/gen_crds.py` -> `crds/`) is the single source of every default
and constraint. The API server applies them in a cluster and `kiln.schema` applies them offline, so a
second copy of a default in Python would only drift. These classes therefore carry **no default
values**: `from_dict` reads each field's default from the CRD schema when the field is absent (an
absent object field typed as a class, not `X | None`, is read as `{}` and gets its fields' CRD
defaults, which is what the code needs when e.g. `spec.training` is left out). `X | None` means
"absent means off/unset". `tests/unit/test_spec_unit.py` walks the CRD schema and these classes and
fails on any drift: a field in one and not the other, a type mismatch, or a field typed as always
present that the CRD neither requires nor defaults.

Adding a CRD field is one line here, next to its line in `scripts/gen_crds.py`: the snake_case name
becomes the camelCase JSON key (`json_key` metadata for irregular ones such as `targetCPUUtilization`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Model")


def json_key(name: str) -> dict[str, str]:
    """Field metadata for a JSON key that is not the camelCase of the field's name."""
    return {"json": name}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


@dataclass(frozen=True)
class _Field:
    name: str
    key: str
    optional: bool
    model: type[Model] | None
    """The class of an object field, or of a list's items."""
    is_list: bool


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(type without None, whether None was allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional  # noqa: UP007
    return hint, False


def _model_of(hint: Any) -> tuple[type[Model] | None, bool]:
    """(Model class of an object field or of a list's items, whether it is a list)."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return (item if isinstance(item, type) and issubclass(item, Model) else None), True
    return (hint if isinstance(hint, type) and issubclass(hint, Model) else None), False


_plans: dict[type[Any], tuple[_Field, ...]] = {}


def plan(cls: type[Model]) -> tuple[_Field, ...]:
    """How each field of `cls` is read (computed once per class)."""
    if cls in _plans:
        return _plans[cls]
    hints = typing.get_type_hints(cls)
    out = []
    klass: Any = cls
    for f in dataclasses.fields(klass):
        hint, optional = _unwrap(hints[f.name])
        model, is_list = _model_of(hint)
        out.append(_Field(f.name, f.metadata.get("json") or camel(f.name), optional, model, is_list))
    _plans[cls] = tuple(out)
    return _plans[cls]


_NO_DEFAULT = object()
_Step = tuple[str, str, Any, "type[Model] | None", bool, bool, "Mapping[str, Any]"]
_compiled: dict[tuple[type[Any], int], tuple[Mapping[str, Any], tuple[_Step, ...]]] = {}


def _steps(cls: type[Model], schema: Mapping[str, Any]) -> tuple[_Step, ...]:
    """Per field of `cls` under `schema`: (name, key, CRD default, model, is_list, optional, sub-schema).

    Computed once per class and schema (the operator parses a spec per reconcile: this keeps it cheap);
    the schema is held with its entry, so its id is never reused for another schema.
    """
    entry = _compiled.get((cls, id(schema)))
    if entry is not None and entry[0] is schema:
        return entry[1]
    props: Mapping[str, Any] = schema.get("properties") or {}
    steps = []
    for f in plan(cls):
        sub = props.get(f.key)
        if sub is None:
            raise SpecError(f"{cls.__name__}.{f.name}: the CRD schema has no field {f.key!r}")
        steps.append((f.name, f.key, sub.get("default", _NO_DEFAULT), f.model, f.is_list, f.optional,
                      sub["items"] if f.is_list and f.model is not None else sub))
    _compiled[(cls, id(schema))] = (schema, tuple(steps))
    return tuple(steps)


_schemas: dict[type[Any], Mapping[str, Any]] = {}


def _find(cls: type[Model], schema: Mapping[str, Any], wanted: type[Model]) -> Mapping[str, Any] | None:
    """The schema node of the first field (depth first) whose class is `wanted`."""
    if cls is wanted:
        return schema
    props = schema.get("properties") or {}
    for f in plan(cls):
        if f.model is not None and f.key in props:
            sub = props[f.key]["items"] if f.is_list else props[f.key]
            found = _find(f.model, sub, wanted)
            if found is not None:
                return found
    return None


class SpecError(ValueError):
    """A spec that does not fit its typed model (only when the schema and the classes drifted apart)."""


class Model:
    """Base of the typed models: `from_dict` reads a (possibly not yet defaulted) spec dict."""

    KIND: ClassVar[str] = ""
    """For a resource's top-level spec: the kind whose CRD schema `from_dict` reads by default."""

    @classmethod
    def schema(cls) -> Mapping[str, Any]:
        """The CRD schema of this class: its resource's `spec`, or (nested) the first field typed as it."""
        found = _schemas.get(cls)
        if found is None:
            from kiln.schema import openapi_schema

            for top in TOP_LEVEL:
                found = _find(top, openapi_schema(top.KIND)["properties"]["spec"], cls)
                if found is not None:
                    break
            if found is None:
                raise SpecError(f"{cls.__name__} is not part of a Kiln spec")
            _schemas[cls] = found
        return found

    @classmethod
    def from_dict(cls: type[M], data: Mapping[str, Any] | None, schema: Mapping[str, Any] | None = None) -> M:
        """The typed spec of `data`; absent fields take their CRD default (none: None, objects: `{}`)."""
        steps = _steps(cls, cls.schema() if schema is None else schema)
        data = data or {}
        values: dict[str, Any] = {}
        for name, key, default, model, is_list, optional, sub in steps:
            value = data.get(key)
            if value is None and default is not _NO_DEFAULT:
                value = copy.deepcopy(default) if isinstance(default, (list, dict)) else default
            if model is not None:
                if value is None and not optional and not is_list:
                    value = {}
                if value is not None:
                    value = [model.from_dict(v, sub) for v in value] if is_list else model.from_dict(value, sub)
            if value is None and not optional:
                raise SpecError(f"{cls.__name__}.{name} ({key}) is missing and the CRD has no default for it")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (camelCase keys, unset fields left out): for the rare value passed on as is."""
        out: dict[str, Any] = {}
        for f in plan(type(self)):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Model):
                value = value.to_dict()
            elif f.is_list and f.model is not None:
                value = [v.to_dict() for v in value]
            out[f.key] = copy.deepcopy(value)
        return out


# ------------------------------------------------------------------------------------------ shared parts
@dataclass(frozen=True)
class Resources(Model):
    gpus: int
    cpu: int | str | None
    memory: int | str | None


@dataclass(frozen=True)
class Toleration(Model):
    key: str | None
    operator: str | None
    value: str | None
    effect: str | None
    toleration_seconds: int | None


@dataclass(frozen=True)
class Scheduling(Model):
    node_selector: dict[str, str] | None
    tolerations: list[Toleration] | None
    priority_class_name: str | None
    queue_name: str | None


# ---------------------------------------------------------------------------------------- ModelDeployment
@dataclass(frozen=True)
class LabelRequirement(Model):
    key: str
    operator: str
    values: list[str] | None


@dataclass(frozen=True)
class LabelSelector(Model):
    """A metav1.LabelSelector (`kiln.labels.selector_matches` reads its `to_dict()`)."""

    match_labels: dict[str, str] | None
    match_expressions: list[LabelRequirement] | None


@dataclass(frozen=True)
class ModelSource(Model):
    training_job: str | None
    training_job_selector: LabelSelector | None
    """The newest succeeded TrainingJob it selects is served."""
    uri: str | None
    format: str
    sha256: str | None


@dataclass(frozen=True)
class Autoscaling(Model):
    min_replicas: int
    max_replicas: int
    target_cpu_utilization: int = field(metadata=json_key("targetCPUUtilization"))


@dataclass(frozen=True)
class Batching(Model):
    max_batch_size: int
    max_latency_ms: float


@dataclass(frozen=True)
class Gateway(Model):
    """`spec.service.gateway`: the Gateway API Gateway an HTTPRoute attaches the model to."""

    name: str
    namespace: str | None
    section_name: str | None
    hostnames: list[str] | None


@dataclass(frozen=True)
class Service(Model):
    type: str
    port: int
    grpc_port: int
    gateway: Gateway | None


@dataclass(frozen=True)
class Limits(Model):
    max_body_bytes: int
    max_elements: int


@dataclass(frozen=True)
class Storage(Model):
    """`spec.storage`: how the pods that touch `s3://` reach the store (kiln.objectstore)."""

    secret_name: str | None
    endpoint: str | None
    region: str | None


@dataclass(frozen=True)
class Auth(Model):
    """`spec.auth`: bearer tokens from a Secret (kiln_server.auth)."""

    token_secret: str
    key: str
    open_metrics: bool


@dataclass(frozen=True)
class NetworkPeer(Model):
    namespace_selector: dict[str, str] | None
    pod_selector: dict[str, str] | None


@dataclass(frozen=True)
class NetworkPolicy(Model):
    """`spec.networkPolicy`: who may connect to the server."""

    from_: list[NetworkPeer] | None = field(metadata=json_key("from"))


@dataclass(frozen=True)
class ServingSpec(Model):
    """What a ModelDeployment and a TrainingJob's `spec.deploy` share: how the model is served."""

    model_name: str | None
    image: str | None
    image_pull_policy: str | None
    replicas: int
    autoscaling: Autoscaling | None
    resources: Resources
    batching: Batching | None
    service: Service
    scheduling: Scheduling
    progress_deadline_seconds: int
    startup_timeout_seconds: int
    limits: Limits | None
    workers: int | None
    storage: Storage | None
    auth: Auth | None
    network_policy: NetworkPolicy | None


@dataclass(frozen=True)
class Canary(Model):
    """`spec.canary`: a second model for `traffic_percent` of the requests (its own Deployment)."""

    model: ModelSource
    traffic_percent: int


@dataclass(frozen=True)
class ModelDeploymentSpec(ServingSpec):
    KIND: ClassVar[str] = "ModelDeployment"

    model: ModelSource
    canary: Canary | None


@dataclass(frozen=True)
class DeployModel(Model):
    format: str


@dataclass(frozen=True)
class DeploySpec(ServingSpec):
    """A TrainingJob's `spec.deploy`: a ModelDeployment spec whose model is the TrainingJob's."""

    model: DeployModel
    name: str | None


# -------------------------------------------------------------------------------------------- TrainingJob
@dataclass(frozen=True)
class SecretRef(Model):
    name: str


@dataclass(frozen=True)
class EnvVar(Model):
    name: str
    value: str | None
    value_from: dict[str, Any] | None


@dataclass(frozen=True)
class Augmentation(Model):
    horizontal_flip: bool
    vertical_flip: bool | None
    crop: float | None
    contrast: float | None
    mixup: float | None
    gaussian_noise: float | None
    rotation: float
    zoom: float
    translation: float


@dataclass(frozen=True)
class Pca(Model):
    """`preprocessing.pca`: exactly one of the two (the CRD's oneOf)."""

    components: int | None
    variance_ratio: float | None


@dataclass(frozen=True)
class Preprocessing(Model):
    drop_duplicates: bool
    missing_values: str
    normalization: str
    drop_columns: list[str] | None
    variance_threshold: float | None
    pca: Pca | None
    augmentation: Augmentation | None


@dataclass(frozen=True)
class Balance(Model):
    strategy: str


@dataclass(frozen=True)
class Dataset(Model):
    uri: str
    format: str | None
    label_column: str
    feature_columns: list[str] | None
    validation_split: float
    preprocessing: Preprocessing
    balance: Balance | None


@dataclass(frozen=True)
class KernelRegularizer(Model):
    l1: float | None
    l2: float | None


@dataclass(frozen=True)
class Layer(Model):
    type: str
    name: str | None
    units: int | None
    activation: str | None
    rate: float | None
    filters: int | None
    kernel_size: int | None
    strides: int | None
    padding: str | None
    pool_size: int | None
    target_shape: list[int] | None
    momentum: float | None
    kernel_initializer: str | None
    kernel_regularizer: KernelRegularizer | None


@dataclass(frozen=True)
class Network(Model):
    input_shape: list[int]
    layers: list[Layer]


@dataclass(frozen=True)
class Optimizer(Model):
    name: str
    learning_rate: float
    momentum: float | None
    nesterov: bool | None
    beta1: float | None
    beta2: float | None
    epsilon: float | None
    rho: float | None
    weight_decay: float | None
    clip_norm: float | None
    clip_value: float | None


@dataclass(frozen=True)
class LearningRateSchedule(Model):
    """`training.learningRateSchedule`: which fields apply depends on `type` (kiln_trainer.schedules checks)."""

    type: str
    warmup_epochs: int | None
    decay_rate: float | None
    decay_steps: int | None
    min_learning_rate: float | None
    patience: int | None
    factor: float | None


@dataclass(frozen=True)
class EarlyStopping(Model):
    monitor: str
    patience: int
    min_delta: float


@dataclass(frozen=True)
class Training(Model):
    optimizer: Optimizer
    learning_rate_schedule: LearningRateSchedule | None
    loss: str
    metrics: list[str]
    epochs: int
    batch_size: int
    early_stopping: EarlyStopping | None
    class_weight: str
    seed: int | None


@dataclass(frozen=True)
class Onnx(Model):
    opset: int


@dataclass(frozen=True)
class Output(Model):
    uri: str | None
    onnx: Onnx
    formats: list[str]
    parity_tolerance: float
    explain: bool | None
    format_tolerance: float
    quantization: str


@dataclass(frozen=True)
class Tuning(Model):
    """`spec.tuning`: `parameters` maps a spec path to a list of values or `{min, max, log}` (kiln_trainer.tuning)."""

    algorithm: str
    parallelism: int
    trials: int | None
    metric: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class RunPolicy(Model):
    backoff_limit: int
    active_deadline_seconds: int | None
    ttl_seconds_after_finished: int | None
    start_timeout_seconds: int
    suspend: bool
    restart_policy: str


@dataclass(frozen=True)
class TrainingJobSpec(Model):
    KIND: ClassVar[str] = "TrainingJob"

    image: str | None
    image_pull_policy: str | None
    image_pull_secrets: list[SecretRef] | None
    command: list[str] | None
    args: list[str] | None
    env: list[EnvVar] | None
    dataset: Dataset | None
    model: Network | None
    training: Training
    tuning: Tuning | None
    resources: Resources
    workers: int
    output: Output
    run_policy: RunPolicy
    scheduling: Scheduling
    service_account_name: str | None
    storage: Storage | None
    deploy: DeploySpec | None


TOP_LEVEL: tuple[type[Model], ...] = (TrainingJobSpec, ModelDeploymentSpec)
"""The resources' spec classes (the drift test starts from these)."""
