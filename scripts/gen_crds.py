"""Generates crds/*.yaml (and the chart's copy) from one Python definition.

Why a generator: both CRDs share sub-schemas (resources, scheduling, the ModelDeployment spec that a
TrainingJob embeds as `deploy`), and hand-copied YAML drifts. The generated files are committed; a test
fails when they are stale. Run: `python scripts/gen_crds.py`.

These schemas are the single source of Kiln's defaults and constraints: the typed specs in
`kiln/spec.py` carry none of their own and a unit test (tests/core/test_spec_unit.py) fails when the two
drift. Adding a field is one line here and one line there.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the group and version are the shared core's (kiln/__init__.py)
from kiln import GROUP, VERSION  # noqa: E402

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def s(type_: str, desc: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type_, "description": desc}
    out.update(kw)
    return out


def obj(desc: str, props: dict[str, Any], required: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    out = {"type": "object", "description": desc, "properties": props}
    if required:
        out["required"] = required
    out.update(kw)
    return out


def arr(desc: str, items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "array", "description": desc, "items": items, **kw}


def quantity(desc: str) -> dict[str, Any]:
    return {"description": desc, "x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}


def string_map(desc: str) -> dict[str, Any]:
    return {"type": "object", "description": desc, "additionalProperties": {"type": "string"}}


def number_map(desc: str) -> dict[str, Any]:
    return {"type": "object", "description": desc, "additionalProperties": {"type": "number"}}


RESOURCES = obj(
    "Compute resources for each pod.",
    {
        "gpus": s("integer", "NVIDIA GPUs per pod (`nvidia.com/gpu` limit). With gpus > 0 the pod also tolerates the `nvidia.com/gpu` taint.", minimum=0, maximum=16, default=0),
        "cpu": quantity("CPU request and limit per pod, a Kubernetes quantity such as `2` or `500m`."),
        "memory": quantity("Memory request and limit per pod, a Kubernetes quantity such as `4Gi`."),
    },
)

TOLERATION = obj(
    "A Kubernetes toleration.",
    {
        "key": s("string", "Taint key the toleration applies to."),
        "operator": s("string", "Exists or Equal.", enum=["Exists", "Equal"]),
        "value": s("string", "Taint value for operator Equal."),
        "effect": s("string", "Taint effect to match; empty matches all.", enum=["NoSchedule", "PreferNoSchedule", "NoExecute", ""]),
        "tolerationSeconds": s("integer", "For NoExecute: how long the pod stays bound after the taint appears.", minimum=0),
    },
)

SCHEDULING = obj(
    "Where the pods may run.",
    {
        "nodeSelector": string_map("Node labels the pods must match."),
        "tolerations": arr("Tolerations added to the pods.", TOLERATION),
        "priorityClassName": s("string", "PriorityClass of the pods.", maxLength=253),
        "queueName": s("string", "Kueue LocalQueue: sets the `kueue.x-k8s.io/queue-name` label so Kueue admits the Job.", maxLength=63, pattern=DNS_LABEL),
    },
)

CONDITION = obj(
    "A condition as metav1.Condition (what kubectl wait, kstatus/Flux and Argo CD read).",
    {
        "type": s("string", "Condition type, e.g. Ready.", maxLength=316,
                  pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"),
        "status": s("string", "True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": s("string", "One-word CamelCase reason.", minLength=1, maxLength=1024,
                    pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
        "message": s("string", "Human-readable detail.", maxLength=32768),
        "lastTransitionTime": s("string", "When the status last changed.", format="date-time"),
        "observedGeneration": s("integer", "The .metadata.generation the condition was set for.", minimum=0),
    },
    required=["type", "status", "reason", "message", "lastTransitionTime"],
)


def conditions(desc: str) -> dict[str, Any]:
    """A list of conditions keyed by type (at most one of each)."""
    return arr(desc, CONDITION, **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


LABEL_SELECTOR = obj(
    "A label selector (metav1.LabelSelector): matchLabels and matchExpressions must all match.",
    {
        "matchLabels": string_map("Labels that must be present with these values."),
        "matchExpressions": arr(
            "Set-based requirements.",
            obj("One requirement.", {
                "key": s("string", "Label key.", minLength=1, maxLength=317),
                "operator": s("string", "How the key's value is tested.", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                "values": arr("Values for In and NotIn.", {"type": "string"}),
            }, required=["key", "operator"]),
        ),
    },
)

IO_SPEC = arr(
    "Tensors of the exported model.",
    obj("One tensor.", {"name": s("string", "Tensor name."), "datatype": s("string", "V2 datatype, e.g. FP32."), "shape": arr("Shape; -1 is a variable dimension.", {"type": "integer"})}),
)

ENV_VAR = obj(
    "An environment variable (Kubernetes EnvVar).",
    {
        "name": s("string", "Variable name.", minLength=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"),
        "value": s("string", "Literal value."),
        "valueFrom": {"type": "object", "description": "A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef).", "x-kubernetes-preserve-unknown-fields": True},
    },
    required=["name"],
)

LAYER_TYPES = ["Dense", "Dropout", "BatchNormalization", "Conv2D", "MaxPooling2D", "AveragePooling2D", "Flatten", "GlobalAveragePooling2D", "Reshape"]
ACTIVATIONS = ["linear", "relu", "sigmoid", "softmax", "tanh", "elu", "selu", "gelu", "swish", "softplus", "leaky_relu"]
LOSSES = ["sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mse", "mae", "huber"]
METRICS = ["accuracy", "mse", "mae", "auc", "precision", "recall"]
INITIALIZERS = ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal",
                "orthogonal", "random_normal", "random_uniform", "truncated_normal", "zeros", "ones"]
SCHEDULES = ["constant", "exponential", "cosine", "step", "plateau"]

LAYER = obj(
    "One Keras layer. Which fields apply depends on `type`; the trainer rejects a field that the type does not take.",
    {
        "type": s("string", "Layer type.", enum=LAYER_TYPES),
        "name": s("string", "Optional layer name.", maxLength=63, pattern=r"^[A-Za-z][A-Za-z0-9_]*$"),
        "units": s("integer", "Dense: output units.", minimum=1, maximum=1048576),
        "activation": s("string", "Dense/Conv2D: activation.", enum=ACTIVATIONS),
        "rate": s("number", "Dropout: fraction of units dropped.", minimum=0, maximum=1, exclusiveMaximum=True),
        "filters": s("integer", "Conv2D: number of filters.", minimum=1, maximum=65536),
        "kernelSize": s("integer", "Conv2D: square kernel size.", minimum=1, maximum=64),
        "strides": s("integer", "Conv2D/pooling: stride.", minimum=1, maximum=64),
        "padding": s("string", "Conv2D/pooling: padding.", enum=["valid", "same"]),
        "poolSize": s("integer", "Pooling: square window size.", minimum=1, maximum=64),
        "targetShape": arr("Reshape: target shape without the batch dimension.", {"type": "integer", "minimum": 1}, minItems=1, maxItems=4),
        "momentum": s("number", "BatchNormalization: moving average momentum.", minimum=0, maximum=1),
        "kernelInitializer": s("string", "Dense/Conv2D: how the kernel is initialized (Keras' default glorot_uniform; he_* suit relu).", enum=INITIALIZERS),
        "kernelRegularizer": obj(
            "Dense/Conv2D: weight penalty added to the loss (against overfitting); at least one above 0.",
            {
                "l1": s("number", "L1 factor: sum of absolute weights (drives weights to exactly 0).", minimum=0, maximum=10),
                "l2": s("number", "L2 factor: sum of squared weights (shrinks weights).", minimum=0, maximum=10),
            },
            minProperties=1,
        ),
    },
    required=["type"],
)

STORAGE = obj(
    "Object storage access (`s3://` URIs) for the pods that read or write it: the trainer, and the server's model-fetch init container. Without `secretName` the pods use the AWS default chain: workload identity (IRSA: a ServiceAccount annotated with `eks.amazonaws.com/role-arn`; GKE/Azure equivalents) or an instance role.",
    {
        "secretName": s("string", "A Secret in the same namespace with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (optionally `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`); they become environment variables of those pods only.", maxLength=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        "endpoint": s("string", "S3 endpoint for a store other than AWS (MinIO, SeaweedFS, Ceph RGW, R2, ...), e.g. `http://minio.storage:9000`; set as `AWS_ENDPOINT_URL_S3`.", pattern=r"^https?://[^\s/]+(/\S*)?$", maxLength=2048),
        "region": s("string", "`AWS_REGION` of the bucket (default us-east-1, or the Secret's `AWS_REGION`).", maxLength=64, pattern=r"^[a-z0-9-]+$"),
    },
)

MD_SPEC_PROPS: dict[str, Any] = {
    "model": obj(
        "Which model to serve: exactly one of `trainingJob`, `trainingJobSelector` and `uri`.",
        {
            "trainingJob": s("string", "Name of a TrainingJob in the same namespace; its `status.result.modelUri` is served once it has succeeded. A TrainingJob re-created under this name is followed too; while it trains, the previous model stays served.", maxLength=253, pattern=DNS_LABEL),
            "trainingJobSelector": LABEL_SELECTOR | {"description": "TrainingJobs in the same namespace whose labels match: the newest one that succeeded is served (by completion time), and a newer match rolls the server to its model. While newer matches train, the current model stays served with Ready=True."},
            "uri": s("string", "Location of an ONNX model: `pvc://claim/path/model.onnx`, `s3://bucket/key`, `http(s)://...` or `file://`.", minLength=1),
            "format": s("string", "Which exported format to serve.", enum=["onnx", "onnx-int8"], default="onnx"),
            "sha256": s("string", "Expected sha256 of the model file; the server refuses a different file.", pattern=r"^[a-f0-9]{64}$"),
        },
        oneOf=[{"required": ["trainingJob"]}, {"required": ["trainingJobSelector"]}, {"required": ["uri"]}],
    ),
    "modelName": s("string", "Name in the V2 routes (/v2/models/NAME); defaults to the resource name.", maxLength=63, pattern=DNS_LABEL),
    "image": s("string", "Model server image; defaults to the operator's setting.", minLength=1),
    "imagePullPolicy": s("string", "Image pull policy.", enum=["Always", "IfNotPresent", "Never"]),
    "replicas": s("integer", "Replicas when `autoscaling` is not set.", minimum=0, maximum=1000, default=1),
    "autoscaling": obj(
        "Horizontal pod autoscaling (autoscaling/v2 HPA on CPU).",
        {
            "minReplicas": s("integer", "Lower bound.", minimum=1, maximum=1000, default=1),
            "maxReplicas": s("integer", "Upper bound.", minimum=1, maximum=1000),
            "targetCPUUtilization": s("integer", "Target average CPU utilization in percent.", minimum=1, maximum=100, default=80),
        },
        required=["maxReplicas"],
    ),
    "resources": RESOURCES,
    "batching": obj(
        "Dynamic batching in the server: concurrent requests run as one batch.",
        {
            "maxBatchSize": s("integer", "Largest batch in rows.", minimum=1, maximum=4096, default=32),
            "maxLatencyMs": s("number", "Longest wait for a batch to fill, in milliseconds.", minimum=0, maximum=10000, default=5),
        },
    ),
    "service": obj(
        "The Service in front of the server.",
        {
            "type": s("string", "Service type.", enum=["ClusterIP", "NodePort", "LoadBalancer"], default="ClusterIP"),
            "port": s("integer", "Service port.", minimum=1, maximum=65535, default=80),
            "grpcPort": s("integer", "Service port of the Open Inference Protocol's gRPC API (port name `grpc`, `appProtocol: grpc`); 0 turns gRPC off. Must differ from `port`.", minimum=0, maximum=65535, default=9000),
            "gateway": obj(
                "A Gateway API Gateway to route HTTP through: where the cluster serves `gateway.networking.k8s.io` HTTPRoutes, the operator renders an HTTPRoute `<name>` attached to it, backed by per-track Services `<name>-stable` and `<name>-canary`, and splits a canary's traffic by the route's weights (exact percent) instead of by replica ratio. Setting it rolls the stable pods once (they get the `kiln.dev/track: stable` label the stable Service selects). The gRPC port is not routed (no GRPCRoute).",
                {
                    "name": s("string", "Name of the Gateway (parentRef).", maxLength=253, pattern=DNS_LABEL),
                    "namespace": s("string", "Its namespace; default: the ModelDeployment's.", maxLength=63, pattern=DNS_LABEL),
                    "sectionName": s("string", "The Gateway listener to attach to; default: every listener that allows the route.", maxLength=253, pattern=DNS_LABEL),
                    "hostnames": arr("Host names the route matches (HTTPRoute `hostnames`); default: those of the listener.", s("string", "A host name, optionally with a leading `*.`.", maxLength=253, pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"), maxItems=16),
                },
                required=["name"],
            ),
        },
    ),
    "workers": s("integer", "Server processes per pod, sharing its ports (`kiln serve --workers`), each with its own model session. Default: the CPU request rounded down (at least 1); 1 without a CPU request or with GPUs (each worker would hold its own copy of the model on the GPU).", minimum=1, maximum=256),
    "scheduling": SCHEDULING,
    "progressDeadlineSeconds": s("integer", "A rollout that makes no progress for this long fails (Deployment progressDeadlineSeconds).", minimum=1, default=600),
    "startupTimeoutSeconds": s("integer", "How long a server may take to load its model before the startup probe gives up.", minimum=10, maximum=86400, default=600),
    "storage": STORAGE,
    "limits": obj(
        "Request limits the server enforces.",
        {
            "maxBodyBytes": s("integer", "Largest request body; bigger requests get 413.", minimum=1024, default=67108864),
            "maxElements": s("integer", "Most tensor elements in one request.", minimum=1, default=16777216),
        },
    ),
    "auth": obj(
        "Bearer-token authentication: every route but health (which the kubelet's probes use) needs `Authorization: Bearer TOKEN`; 401 otherwise.",
        {
            "tokenSecret": s("string", "Secret in the same namespace holding the accepted tokens, one per line.", maxLength=253, pattern=DNS_LABEL),
            "key": s("string", "Key of the Secret that holds the tokens.", default="tokens", maxLength=253, pattern=r"^[-._a-zA-Z0-9]+$"),
            "openMetrics": s("boolean", "Serve /metrics without a token too (for a Prometheus without one).", default=False),
        },
        required=["tokenSecret"],
    ),
    "networkPolicy": obj(
        "Who may connect to the server: a NetworkPolicy the operator renders (enforced where the cluster's network plugin supports NetworkPolicies).",
        {
            "from": arr(
                "Allowed clients (NetworkPolicy peers): pods matching `podSelector` in namespaces matching `namespaceSelector`. Default: any pod of the same namespace.",
                obj("One allowed peer.", {
                    "namespaceSelector": string_map("Labels of the clients' namespaces (matchLabels); omitted: this namespace."),
                    "podSelector": string_map("Labels of the client pods (matchLabels); omitted: every pod."),
                }),
                maxItems=32,
            ),
        },
    ),
}

MD_SPEC_PROPS["canary"] = obj(
    "A second model served next to `model` for a share of the traffic: a Deployment `<name>-canary` behind the same Service. Without `spec.service.gateway` (or where the cluster has no HTTPRoute), traffic splits by ready-replica ratio: the canary gets round(R x trafficPercent / 100) of the R replicas (at least 1 while trafficPercent > 0, and the stable model keeps at least 1 below 100), so the split's granularity is 1/R. With autoscaling, R is `autoscaling.minReplicas` for the canary's fixed count while the stable HPA keeps its bounds. Promote by moving the canary's model into `spec.model` and removing `canary` (the canary pods serve until the stable Deployment has rolled to that model: none restarts); roll back by removing `canary` alone.",
    {
        "model": copy.deepcopy(MD_SPEC_PROPS["model"]) | {"description": "The canary's model, in the same forms as `spec.model`: exactly one of `trainingJob`, `trainingJobSelector` and `uri`."},
        "trafficPercent": s("integer", "Share of the requests for the canary, in percent (0 keeps the canary Deployment at 0 replicas, 100 sends everything to it).", minimum=0, maximum=100),
    },
    required=["model", "trafficPercent"],
)

MODELDEPLOYMENT_SPEC = obj("What to serve and how.", MD_SPEC_PROPS, required=["model"])

DEPLOY_SPEC = copy.deepcopy(MODELDEPLOYMENT_SPEC)
DEPLOY_SPEC["description"] = (
    "A ModelDeployment spec to create when training succeeds. `model` may be left out: it defaults to this TrainingJob."
)
DEPLOY_SPEC.pop("required")
DEPLOY_SPEC["properties"].pop("canary")  # a canary is a change to a running ModelDeployment, not part of its creation
DEPLOY_SPEC["properties"]["model"] = obj(
    "Optional: defaults to this TrainingJob's ONNX model.",
    {"format": MD_SPEC_PROPS["model"]["properties"]["format"]},
)
DEPLOY_SPEC["properties"]["name"] = s("string", "Name of the ModelDeployment; defaults to the TrainingJob's name.", maxLength=63, pattern=DNS_LABEL)

TRAININGJOB_SPEC = obj(
    "A training run: either the built-in trainer (`dataset`, `model`, `training`) or your own `command`.",
    {
        "image": s("string", "Trainer image; defaults to the operator's setting.", minLength=1),
        "imagePullPolicy": s("string", "Image pull policy.", enum=["Always", "IfNotPresent", "Never"]),
        "imagePullSecrets": arr("Secrets for pulling the image.", obj("A secret reference.", {"name": s("string", "Secret name.")}, required=["name"])),
        "command": arr("Bring your own code: the container command. Without it the built-in trainer runs.", {"type": "string"}, minItems=1),
        "args": arr("Arguments for `command`.", {"type": "string"}),
        "env": arr("Extra environment variables.", ENV_VAR),
        "dataset": obj(
            "Training data.",
            {
                "uri": s("string", "`file://`, a path, `pvc://claim/path` (mounted) or `s3://bucket/key`.", minLength=1),
                "format": s("string", "File format; inferred from the extension when left out.", enum=["csv", "npz", "parquet"]),
                "labelColumn": s("string", "CSV/Parquet: the label column.", minLength=1, default="label"),
                "featureColumns": arr("CSV/Parquet: feature columns; default all but the label.", {"type": "string", "minLength": 1}, minItems=1),
                "validationSplit": s("number", "Fraction held out for validation and the parity check.", minimum=0.01, maximum=0.9, default=0.2),
                "preprocessing": obj(
                    "Cleaning, normalization and augmentation.",
                    {
                        "dropDuplicates": s("boolean", "Drop duplicate rows.", default=True),
                        "missingValues": s("string", "Rows with missing features: drop them, or impute by mean, median or zero (imputation is part of the exported model).", enum=["drop", "mean", "median", "zero"], default="drop"),
                        "normalization": s("string", "Feature scaling fitted on the training split and exported inside the model.", enum=["none", "standard", "minmax"], default="none"),
                        "dropColumns": arr("CSV/Parquet: feature columns the model ignores; the exported model still takes every raw column (the drop is in the graph).", {"type": "string", "minLength": 1}, minItems=1),
                        "varianceThreshold": s("number", "Drop feature columns whose variance on the training split is at or below this (0 drops constant columns); in the exported graph like dropColumns.", minimum=0),
                        "pca": obj(
                            "Principal component analysis fitted on the training split (after imputation and normalization) and exported in the graph: the model takes raw features. Exactly one of components and varianceRatio; flat inputs only.",
                            {
                                "components": s("integer", "Number of components kept.", minimum=1, maximum=65536),
                                "varianceRatio": s("number", "Keep the fewest components that explain at least this share of the variance.", minimum=0, exclusiveMinimum=True, maximum=1),
                            },
                            oneOf=[{"required": ["components"]}, {"required": ["varianceRatio"]}],
                        ),
                        "augmentation": obj(
                            "Augmentation, active in training only (never in the exported model). Image fields need inputShape [H, W, C]; gaussianNoise works on any input.",
                            {
                                "horizontalFlip": s("boolean", "Random horizontal flips.", default=False),
                                "verticalFlip": s("boolean", "Random vertical flips."),
                                "crop": s("number", "Random crop of up to this fraction of height and width, resized back to the input size.", minimum=0, maximum=0.9),
                                "contrast": s("number", "Random contrast: each channel's deviation from its mean scaled by a factor in [1 - contrast, 1 + contrast].", minimum=0, maximum=1),
                                "mixup": s("number", "Mixup: train on convex mixtures of pairs of rows and their labels, the mix drawn from Beta(mixup, mixup) (0.2 is usual; 0 is off). Losses: cross-entropies and mse.", minimum=0, maximum=10),
                                "gaussianNoise": s("number", "Additive Gaussian noise with this standard deviation on the normalized values (in standard deviations with normalization: standard).", minimum=0, maximum=10),
                                "rotation": s("number", "Random rotation, as a fraction of a full turn.", minimum=0, maximum=1, default=0),
                                "zoom": s("number", "Random zoom factor.", minimum=0, maximum=1, default=0),
                                "translation": s("number", "Random translation, as a fraction of height/width.", minimum=0, maximum=1, default=0),
                            },
                        ),
                    },
                ),
                "balance": obj(
                    "Imbalanced classes: reweight or resample the training split (never the held-out rows). Classification losses only.",
                    {"strategy": s("string", "classWeights: weight the loss by n / (k * count) per class; oversample: repeat minority rows (with replacement) up to the majority count; undersample: drop majority rows down to the minority count.", enum=["classWeights", "oversample", "undersample"])},
                    required=["strategy"],
                ),
            },
            required=["uri"],
        ),
        "model": obj(
            "The network: layers applied in order to inputs of `inputShape`.",
            {
                "inputShape": arr("Shape of one example, without the batch dimension.", {"type": "integer", "minimum": 1, "maximum": 1048576}, minItems=1, maxItems=4),
                "layers": arr("Layers in order.", LAYER, minItems=1, maxItems=256),
            },
            required=["inputShape", "layers"],
        ),
        "training": obj(
            "How to train.",
            {
                "optimizer": obj(
                    "Optimizer and its hyperparameters.",
                    {
                        "name": s("string", "Optimizer.", enum=["sgd", "adam", "rmsprop", "adamw"], default="adam"),
                        "learningRate": s("number", "Learning rate.", minimum=0, exclusiveMinimum=True, maximum=10, default=0.001),
                        "momentum": s("number", "sgd, rmsprop: momentum.", minimum=0, maximum=1),
                        "nesterov": s("boolean", "sgd: Nesterov momentum."),
                        "beta1": s("number", "adam, adamw: beta_1.", minimum=0, maximum=1, exclusiveMaximum=True),
                        "beta2": s("number", "adam, adamw: beta_2.", minimum=0, maximum=1, exclusiveMaximum=True),
                        "epsilon": s("number", "adam, adamw, rmsprop: epsilon.", minimum=0, exclusiveMinimum=True),
                        "rho": s("number", "rmsprop: discounting factor.", minimum=0, maximum=1),
                        "weightDecay": s("number", "adamw: decoupled weight decay.", minimum=0),
                        "clipNorm": s("number", "Every optimizer: rescale each gradient to at most this L2 norm (against exploding gradients). Not with clipValue.", minimum=0, exclusiveMinimum=True),
                        "clipValue": s("number", "Every optimizer: clip each gradient element to [-clipValue, clipValue]. Not with clipNorm.", minimum=0, exclusiveMinimum=True),
                    },
                    **{"not": {"required": ["clipNorm", "clipValue"]}},
                ),
                "learningRateSchedule": obj(
                    "How the learning rate changes per epoch, starting from optimizer.learningRate. Each epoch's rate is recorded in history.json (learning_rate).",
                    {
                        "type": s("string", "constant; exponential: lr * decayRate^(t/decaySteps); step: lr * decayRate^floor(t/decaySteps); cosine: from lr down to minLearningRate over decaySteps epochs; plateau: multiply by factor after patience epochs without a better val_loss.", enum=SCHEDULES, default="constant"),
                        "warmupEpochs": s("integer", "Ramp linearly up to the learning rate over this many epochs first (fewer than epochs).", minimum=0, maximum=100000),
                        "decayRate": s("number", "exponential, step: factor per decaySteps epochs.", minimum=0, exclusiveMinimum=True, maximum=1),
                        "decaySteps": s("integer", "exponential, step: epochs per decay; cosine: length of the decay in epochs (default: all epochs after warmup).", minimum=1),
                        "minLearningRate": s("number", "exponential, step, cosine, plateau: the rate never goes below this (must be below learningRate).", minimum=0),
                        "patience": s("integer", "plateau: epochs without improvement of val_loss before reducing.", minimum=1),
                        "factor": s("number", "plateau: multiply the rate by this.", minimum=0, exclusiveMinimum=True, maximum=1, exclusiveMaximum=True),
                    },
                ),
                "loss": s("string", "Loss function.", enum=LOSSES, default="sparse_categorical_crossentropy"),
                "metrics": arr("Metrics reported per epoch.", {"type": "string", "enum": METRICS}, default=["accuracy"]),
                "epochs": s("integer", "Epochs.", minimum=1, maximum=100000, default=10),
                "batchSize": s("integer", "Batch size (global across workers).", minimum=1, maximum=1048576, default=32),
                "earlyStopping": obj(
                    "Stop when the monitored value stops improving.",
                    {
                        "monitor": s("string", "Value to watch, e.g. val_loss or val_accuracy.", default="val_loss"),
                        "patience": s("integer", "Epochs without improvement before stopping.", minimum=0, default=3),
                        "minDelta": s("number", "Smallest change that counts as improvement.", minimum=0, default=0),
                    },
                ),
                "classWeight": s("string", "`balanced` weights classes inversely to their frequency.", enum=["none", "balanced"], default="none"),
                "seed": s("integer", "Seed for data splitting, initialization and shuffling: a run is repeatable.", minimum=0, maximum=2147483647),
            },
        ),
        "tuning": obj(
            "Hyperparameter search: trials run one after another in the trainer pod (workers: 1), or with parallelism > 1 as parallel pods; each is recorded in status.tuning; the best is trained again and exported.",
            {
                "algorithm": s("string", "grid: every combination of the listed values; random: `trials` draws.", enum=["grid", "random"], default="grid"),
                "parallelism": s("integer", "Trials run at once. 1: one after another in the trainer pod. More: one pod per trial, at most this many at a time (an Indexed Job where the cluster has them, else one Job per trial), then the best is trained in the training Job.", minimum=1, maximum=100, default=1),
                "trials": s("integer", "random: number of trials (default 10); grid: an upper bound that must cover the grid.", minimum=1, maximum=1000),
                "metric": s("string", "What picks the best trial: its last-epoch val_accuracy (highest) or val_loss (lowest).", enum=["val_accuracy", "val_loss"], default="val_loss"),
                "parameters": {
                    "type": "object",
                    "description": "Path into the spec (starting with model. or training., e.g. `training.optimizer.learningRate`, `model.layers[0].units`) -> a list of values, or for random `{min, max, log}`.",
                    "minProperties": 1,
                    "additionalProperties": {"description": "A list of values or {min, max, log}.", "x-kubernetes-preserve-unknown-fields": True},
                },
            },
            required=["parameters"],
        ),
        "resources": RESOURCES,
        "workers": s("integer", "Worker pods; more than 1 runs multi-worker mirrored training on an Indexed Job.", minimum=1, maximum=64, default=1),
        "output": obj(
            "Where the model goes.",
            {
                "uri": s("string", "`pvc://claim/path`, `s3://bucket/prefix`, `file://` or a path.", minLength=1),
                "onnx": obj("ONNX export.", {"opset": s("integer", "ONNX opset.", minimum=13, maximum=18, default=17)}),
                "formats": arr(
                    "Formats to export next to the Keras model.",
                    {"type": "string", "enum": ["onnx", "onnx-int8", "tflite", "tflite-int8", "keras-h5"]},
                    minItems=1, default=["onnx"],
                ),
                "parityTolerance": s("number", "Largest allowed max abs difference between Keras and ONNX Runtime outputs.", minimum=0, default=0.0001),
                "explain": s("boolean", "Permutation feature importance on the held-out rows through model.onnx: explanations.json, explanations.png, the top features in status.result.topFeatures. Flat inputs only."),
                "formatTolerance": s("number", "Largest allowed drop of the held-out metric for a derived format (int8, tflite); a negative value turns the check off.", default=0.02),
                "quantization": s("string", "How onnx-int8 is quantized: dynamic (int8 weights, activations quantized at run time), static (activations calibrated on training rows) or auto (static when the model has Conv2D layers, else dynamic).", enum=["auto", "dynamic", "static"], default="auto"),
            },
        ),
        "runPolicy": obj(
            "How the Job runs.",
            {
                "backoffLimit": s("integer", "Pod retries before the job fails.", minimum=0, maximum=100, default=0),
                "activeDeadlineSeconds": s("integer", "Wall-clock limit of the job.", minimum=1),
                "ttlSecondsAfterFinished": s("integer", "Delete the finished Job (not the TrainingJob) after this many seconds.", minimum=0),
                "startTimeoutSeconds": s("integer", "Fail the job when its pod cannot start (image pull errors) for this long.", minimum=1, default=600),
                "suspend": s("boolean", "Create the Job suspended (resumed by setting false, or by Kueue).", default=False),
                "restartPolicy": s("string", "Never: each retry is a new pod (counted by backoffLimit). OnFailure: the container restarts in place (CrashLoopBackOff shows in status).", enum=["Never", "OnFailure"], default="Never"),
            },
        ),
        "scheduling": SCHEDULING,
        "serviceAccountName": s("string", "Service account of the training pods; default is one the operator creates that may only report progress.", maxLength=253),
        "storage": STORAGE,
        "deploy": DEPLOY_SPEC,
    },
    anyOf=[{"required": ["command"]}, {"required": ["dataset", "model"]}],
)

TRAININGJOB_STATUS = obj(
    "Observed state, written by the operator (and progress by the trainer).",
    {
        "phase": s("string", "Lifecycle phase.", enum=["Pending", "Running", "Succeeded", "Failed", "Suspended"]),
        "reason": s("string", "Why the job is in this phase, e.g. ImagePullBackOff, WaitingForGPU, OOMKilled."),
        "message": s("string", "Detail for the reason."),
        "conditions": conditions("Conditions: Created, Running, Succeeded, Failed (Kubeflow's), Ready (True once Succeeded), Reconciling (pending or running), Stalled (failed for good), and Restarting, SpecChangeIgnored when they apply. All but the last two are present from the first status write."),
        "progress": obj(
            "Live training progress, patched by the trainer each epoch.",
            {
                "epoch": s("integer", "Finished epochs."),
                "epochs": s("integer", "Planned epochs."),
                "percent": s("integer", "Finished share in percent.", minimum=0, maximum=100),
                "metrics": number_map("Latest epoch metrics."),
                "updateTime": s("string", "When progress was last reported.", format="date-time"),
            },
        ),
        "startTime": s("string", "When the training pod started running.", format="date-time"),
        "completionTime": s("string", "When the job finished.", format="date-time"),
        "jobName": s("string", "The batch/v1 Job."),
        "observedGeneration": s("integer", "The metadata.generation this status was written for (on every write)."),
        "result": obj(
            "What a successful run produced.",
            {
                "metrics": number_map("Final metrics, including held-out ones."),
                "modelUri": s("string", "The ONNX model."),
                "onnxSha256": s("string", "sha256 of the ONNX file."),
                "parityMaxAbsDiff": s("number", "Max abs difference between Keras and ONNX Runtime on held-out rows."),
                "inputs": IO_SPEC,
                "outputs": IO_SPEC,
                "topFeatures": arr(
                    "With spec.output.explain: the most important feature columns (permutation importance on held-out rows).",
                    obj("One column.", {"feature": s("string", "Column name."), "importance": s("number", "Drop of the held-out metric when the column is shuffled.")}),
                ),
                "formats": arr(
                    "Every exported format with its cost.",
                    obj(
                        "One exported file.",
                        {
                            "format": s("string", "onnx, onnx-int8, tflite, tflite-int8 or keras-h5."),
                            "file": s("string", "File name under the output location."),
                            "uri": s("string", "Full location."),
                            "sizeBytes": s("integer", "File size."),
                            "sha256": s("string", "sha256 of the file."),
                            "metric": s("number", "Held-out metric measured on this file in its own runtime."),
                            "metricName": s("string", "Which metric."),
                            "delta": s("number", "Metric minus the float Keras model's metric."),
                        },
                    ),
                ),
            },
        ),
        "deployment": s("string", "The ModelDeployment created from `spec.deploy`."),
        "tuning": obj(
            "With spec.tuning: every finished trial and the best so far, patched after each trial (by the trainer, or by the operator for parallel trials).",
            {
                "algorithm": s("string", "grid or random."),
                "metric": s("string", "The metric that picks the best."),
                "mode": s("string", "How the trials ran: Sequential (in the trainer pod), IndexedJob (one Indexed Job) or JobPerTrial (one Job per trial; API servers without Indexed Jobs).", enum=["Sequential", "IndexedJob", "JobPerTrial"]),
                "seed": s("integer", "The seed every trial used."),
                "total": s("integer", "Trials in the search."),
                "running": s("integer", "Parallel trials: trials started and not finished."),
                "failed": s("integer", "Parallel trials: trials that failed."),
                "trials": arr("Finished trials in order.", obj("One trial.", {
                    "trial": s("integer", "Index, from 0."),
                    "parameters": {"type": "object", "description": "The values this trial used, by spec path.", "x-kubernetes-preserve-unknown-fields": True},
                    "metrics": number_map("Its last-epoch metrics, held-out ones included."),
                    "score": s("number", "Its value of the tuning metric."),
                    "phase": s("string", "Parallel trials: Succeeded or Failed.", enum=["Succeeded", "Failed"]),
                    "reason": s("string", "Why a trial failed, e.g. TrialFailed (its training failed for its values), OOMKilled, Error."),
                    "message": s("string", "Detail for the reason."),
                })),
                "best": s("integer", "Index of the best trial so far."),
                "bestScore": s("number", "Its score."),
                "bestParameters": {"type": "object", "description": "Its parameters.", "x-kubernetes-preserve-unknown-fields": True},
            },
        ),
    },
)

SERVED_MODEL = obj(
    "The model being served.",
    {"uri": s("string", "Model location."), "sha256": s("string", "Its digest."), "trainingJob": s("string", "The TrainingJob it came from."), "format": s("string", "Its format.")},
)

MODELDEPLOYMENT_STATUS = obj(
    "Observed state, written by the operator.",
    {
        "phase": s("string", "Lifecycle phase.", enum=["WaitingForModel", "Deploying", "Ready", "Failed"]),
        "reason": s("string", "Why, e.g. TrainingJobNotSucceeded, ProgressDeadlineExceeded."),
        "message": s("string", "Detail for the reason."),
        "conditions": conditions("Conditions: Ready (the current model is rolled out and served), ModelResolved, Available (some replica serves), PredictorReady, Reconciling (waiting for a model or rolling out), Stalled (cannot go on without a change), AutoscalerReady, CanaryReady (the canary Deployment is rolled out and available; False with reason NoCanary without `spec.canary`, Promoting while a promoted canary hands off, RollingBack while a removed canary waits for a stable pod). Ready (the stable model and the canary rolled out) is present, False with a reason, from the first status write."),
        "replicas": s("integer", "Pods of the current Deployment."),
        "readyReplicas": s("integer", "Ready pods."),
        "url": s("string", "In-cluster URL of the model's V2 routes."),
        "grpcAddress": s("string", "In-cluster address (host:port) of the gRPC API (`inference.GRPCInferenceService`); absent when `spec.service.grpcPort` is 0."),
        "model": SERVED_MODEL,
        "canary": obj(
            "The canary (`spec.canary`), next to the stable model's fields; absent without one.",
            {
                "model": SERVED_MODEL | {"description": "The canary model being served (once its Deployment has rolled it out), with its digest."},
                "replicas": s("integer", "Pods of the canary Deployment."),
                "readyReplicas": s("integer", "Its ready pods."),
                "trafficPercent": s("integer", "The canary's effective share of the requests now: the HTTPRoute's weight, or its share of the ready pods (replica ratio)."),
                "routing": s("string", "How the traffic is split.", enum=["ReplicaRatio", "HTTPRoute"]),
            },
        ),
        "observedGeneration": s("integer", "The metadata.generation this status was written for (on every write)."),
    },
)


def crd(kind: str, plural: str, short: str, spec: dict[str, Any], status: dict[str, Any], columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/part-of": "kiln"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(), "shortNames": [short], "categories": ["kiln"]},
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"{kind} of Kiln (kiln.dev).",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                            "required": ["spec"],
                        }
                    },
                }
            ],
        },
    }


def build() -> dict[str, dict[str, Any]]:
    tj = crd(
        "TrainingJob", "trainingjobs", "tj", TRAININGJOB_SPEC, TRAININGJOB_STATUS,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Finished epochs in percent."},
            {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpus"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
            {"name": "Best", "type": "number", "jsonPath": ".status.tuning.bestScore", "priority": 1, "description": "With spec.tuning: the best trial's score so far."},
            {"name": "Model", "type": "string", "jsonPath": ".status.result.modelUri", "priority": 1},
            {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status", "priority": 1, "description": "The Ready condition: True once the training succeeded."},
        ],
    )
    md = crd(
        "ModelDeployment", "modeldeployments", "md", MODELDEPLOYMENT_SPEC, MODELDEPLOYMENT_STATUS,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Model", "type": "string", "jsonPath": ".status.model.trainingJob"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
            {"name": "Available", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Available\")].status", "priority": 1, "description": "Whether some replica serves (also while a new model rolls out)."},
            {"name": "Canary", "type": "integer", "jsonPath": ".status.canary.trafficPercent", "priority": 1, "description": "With spec.canary: the canary's effective share of the requests, in percent."},
        ],
    )
    return {"trainingjobs.yaml": tj, "modeldeployments.yaml": md}


HEADER = "# Generated by scripts/gen_crds.py: edit that file, then run it.\n"


def render() -> dict[str, str]:
    return {name: HEADER + yaml.safe_dump(doc, sort_keys=False, width=120) for name, doc in build().items()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for folder in (ROOT / "crds", ROOT / "charts" / "kiln" / "crds"):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in render().items():
            path = folder / name
            if check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                path.write_text(text)
    if stale:
        print("stale, run python scripts/gen_crds.py:", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
