"""Choosing the tf.distribute strategy: multi-worker, several GPUs, one GPU or CPU.

Why TF_CONFIG is built here: the operator renders an Indexed Job whose pods know the worker host list
(`KILN_WORKER_HOSTS`, index order) and their own `JOB_COMPLETION_INDEX`, which is all TF_CONFIG holds.
A TF_CONFIG set by the user (bring-your-own setups) is left alone. Worker 0 is the chief: only it
writes the final outputs and reports progress.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln_trainer.errors import SpecError

log = logging.getLogger("kiln_trainer.distributed")


@dataclass(frozen=True)
class Cluster:
    """This process's place in a (possibly one-process) training cluster."""

    workers: int
    index: int
    task_type: str = "worker"

    @property
    def chief(self) -> bool:
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0)

    @property
    def multi_worker(self) -> bool:
        return self.workers > 1


def tf_config_from_env(env: dict[str, str]) -> dict[str, Any] | None:
    """TF_CONFIG for this pod from `KILN_WORKER_HOSTS` and `JOB_COMPLETION_INDEX`, or None if not multi-worker."""
    hosts = [h.strip() for h in env.get("KILN_WORKER_HOSTS", "").split(",") if h.strip()]
    if len(hosts) < 2:
        return None
    raw = env.get("JOB_COMPLETION_INDEX", "0")
    try:
        index = int(raw)
    except ValueError as exc:
        raise SpecError(f"JOB_COMPLETION_INDEX must be an integer, got {raw!r}", "spec.workers") from exc
    if not 0 <= index < len(hosts):
        raise SpecError(f"JOB_COMPLETION_INDEX {index} is outside the {len(hosts)} worker hosts", "spec.workers")
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def setup(env: Mapping[str, str] | None = None) -> Cluster:
    """Set TF_CONFIG when the operator gave us worker hosts; describe this process's role."""
    source: Mapping[str, str] = os.environ if env is None else env
    raw = source.get("TF_CONFIG")
    if not raw:
        built = tf_config_from_env(dict(source))
        if built is not None:
            raw = os.environ["TF_CONFIG"] = json.dumps(built)
    if not raw:
        return Cluster(workers=1, index=0)
    try:
        cfg = json.loads(raw)
        cluster = cfg.get("cluster", {})
        task = cfg.get("task", {})
        count = sum(len(v) for k, v in cluster.items() if k in ("worker", "chief"))
        return Cluster(workers=max(count, 1), index=int(task.get("index", 0)), task_type=task.get("type", "worker"))
    except (ValueError, AttributeError, TypeError) as exc:
        raise SpecError(f"TF_CONFIG is not valid JSON of the TensorFlow form: {exc}", None) from exc


def strategy(cluster: Cluster) -> Any:
    """MultiWorkerMirroredStrategy across workers, MirroredStrategy across several GPUs, else the default."""
    import tensorflow as tf

    if cluster.multi_worker:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        log.info("training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    log.info("training on %s", "1 GPU" if gpus else "CPU")
    return tf.distribute.get_strategy()


def fix_keras_multi_worker(model: Any, strategy: Any, example: tuple[Any, ...]) -> None:
    """Work around two Keras 3 (3.15, TF backend) bugs with MultiWorkerMirroredStrategy.

    1. `fit` builds metrics by reducing the first *distributed* batch eagerly, which fails
       ("Attempt to convert a value (PerReplica...)"); we build them from a local batch instead.
    2. Per-step logs (scalars) are reduced with `axis=0`, which fails on rank-0 tensors
       ("Invalid reduction dimension 0"); scalars are reduced with `axis=None`.
    Both only change how Keras sets itself up and averages logs, not the gradients.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = getattr(tf_trainer.reduce_per_replica, "__wrapped__", tf_trainer.reduce_per_replica)

    def reduce_per_replica(values: Any, strat: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strat):
            def one(v: Any) -> Any:
                if not tf_trainer._is_per_replica_instance(v):
                    return v
                rank = v.values[0].shape.rank
                return strat.reduce("MEAN", v, axis=0 if rank else None)

            return tf_trainer.tree.map_structure(one, values)
        return original(values, strat, reduction)

    reduce_per_replica.__wrapped__ = original  # type: ignore[attr-defined]
    tf_trainer.reduce_per_replica = reduce_per_replica

    def symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        with strategy.scope():
            model._symbolic_build(data_batch=example)

    model._maybe_symbolic_build = symbolic_build
