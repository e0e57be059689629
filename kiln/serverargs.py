"""ModelDeployment spec -> `kiln serve` arguments: the one mapping the operator and `kiln run` share.

Why one function: the server pods the operator renders and the server `kiln run` starts on 127.0.0.1
must serve a ModelDeployment the same way (batching, request limits, the model's sha256), and a
field mapped in one place only is silently dropped in the other. Values come from the typed spec
(kiln.spec), whose defaults are the CRD's: with `batching` set, `maxLatencyMs` is the CRD's 5 ms
unless given, never `kiln serve`'s own CLI default (2 ms, for a hand-started server).
"""

from __future__ import annotations

from kiln.spec import ServingSpec


def serve_args(spec: ServingSpec, *, model: str, name: str, host: str, port: int, sha256: str = "") -> list[str]:
    """The `kiln serve` arguments for a ModelDeployment (or `spec.deploy`) spec.

    `model` is the path or URI the server loads and `sha256` the digest it must have ("" when unknown):
    both come from the resolved model (`spec.model.uri`/`sha256`, or the TrainingJob's result), which
    only the caller knows. A model that fails to load (or mismatches `sha256`) makes the server exit.
    """
    args = ["--model", model, "--name", name, "--host", host, "--port", str(port), "--exit-on-load-failure"]
    if sha256:
        args += ["--sha256", sha256]
    if spec.batching is not None:
        args += ["--max-batch-size", str(spec.batching.max_batch_size), "--max-latency-ms", str(spec.batching.max_latency_ms)]
    if spec.limits is not None:
        args += ["--max-body-bytes", str(spec.limits.max_body_bytes), "--max-elements", str(spec.limits.max_elements)]
    if spec.workers:
        args += ["--workers", str(spec.workers)]
    return args
