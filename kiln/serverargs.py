"""ModelDeployment spec -> `kiln serve` arguments: the one mapping the operator and `kiln run` share.

Why one function: the server pods the operator renders and the server `kiln run` starts on 127.0.0.1
must serve a ModelDeployment the same way (batching, request limits, the model's sha256), and a
field mapped in one place only is silently dropped in the other.
"""

from __future__ import annotations

from typing import Any


def serve_args(spec: dict[str, Any], *, model: str, name: str, host: str, port: int, sha256: str = "") -> list[str]:
    """The `kiln serve` arguments for a (CRD-defaulted) ModelDeployment `spec`.

    `model` is the path or URI the server loads and `sha256` the digest it must have ("" when unknown):
    both come from the resolved model (`spec.model.uri`/`sha256`, or the TrainingJob's result), which
    only the caller knows. A model that fails to load (or mismatches `sha256`) makes the server exit.
    """
    args = ["--model", model, "--name", name, "--host", host, "--port", str(port), "--exit-on-load-failure"]
    if sha256:
        args += ["--sha256", sha256]
    batching = spec.get("batching") or {}
    if batching:
        args += ["--max-batch-size", str(batching.get("maxBatchSize", 32)), "--max-latency-ms", str(batching.get("maxLatencyMs", 5))]
    limits = spec.get("limits") or {}
    if limits.get("maxBodyBytes"):
        args += ["--max-body-bytes", str(limits["maxBodyBytes"])]
    if limits.get("maxElements"):
        args += ["--max-elements", str(limits["maxElements"])]
    if spec.get("workers"):
        args += ["--workers", str(spec["workers"])]
    return args
