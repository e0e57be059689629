"""The built-in trainer end to end: data -> preprocessing -> model -> fit -> export -> parity -> outputs.

This is the one code path behind `kiln train FILE` on a laptop, `kiln train --in-cluster` in a pod
and `kiln run` (which passes a progress callback). Each step lives in its own module; this one only
wires them together and decides what goes into the result.
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from typing import Any

import numpy as np

from kiln.spec import Training, TrainingJobSpec
from kiln_trainer import checkpoint, data, distributed, export, optimizers, outputs, preprocess, storage
from kiln_trainer import formats as formats_lib
from kiln_trainer import model as model_lib
from kiln_trainer.errors import DataError, SpecError
from kiln_trainer.jobspec import Job
from kiln_trainer.outputs import Output
from kiln_trainer.progress import EpochLogger, EpochSummaries, ProgressFn, ProgressReporter, StatusPatcher

log = logging.getLogger("kiln_trainer")
PARITY_ROWS = 1024
CLASSIFICATION = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")


def _seed(job: Job, cluster: distributed.Cluster, resumed: checkpoint.Resumed | None) -> int:
    if resumed is not None:
        return resumed.seed
    seed = job.typed.training.seed
    if seed is not None:
        return seed
    if cluster.multi_worker:  # every worker must split the data the same way without talking first
        meta = job.doc.get("metadata", {})
        return zlib.crc32(f"{meta.get('namespace')}/{job.name}/{meta.get('uid')}".encode()) & 0x7FFFFFFF
    return random.SystemRandom().randrange(2**31)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out row indices: a seeded shuffle, the last `fraction` held out."""
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise DataError(f"only {n} rows left after cleaning: too few to hold out {fraction:g} for validation",
                        "spec.dataset.validationSplit")
    order = np.random.default_rng(seed).permutation(n)
    return order[: n - n_val], order[n - n_val :]


def _split(ds: data.Dataset, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    tr, va = split_indices(len(ds.x), fraction, seed)
    return ds.x[tr], ds.y[tr], ds.x[va], ds.y[va]


def _labels(y: np.ndarray, loss: str, out_dim: int, last_layer: int) -> np.ndarray:
    """Labels in the form the loss expects, with errors naming the field that disagrees."""
    if loss == "sparse_categorical_crossentropy":
        if y.ndim != 1 or not np.all(np.equal(np.mod(y, 1), 0)) or (len(y) and y.min() < 0):
            raise DataError("sparse_categorical_crossentropy needs integer class labels 0..K-1",
                            "spec.dataset.labelColumn")
        if len(y) and int(y.max()) >= out_dim:
            raise SpecError(f"labels go up to {int(y.max())} but the last layer has {out_dim} units "
                            f"(needs at least {int(y.max()) + 1})", f"spec.model.layers[{last_layer}].units")
        return y.astype("int64")
    if loss == "categorical_crossentropy" and y.ndim == 1:
        yi = y.astype("int64")
        if len(y) and (yi.min() < 0 or yi.max() >= out_dim):
            raise SpecError(f"labels 0..{int(yi.max())} do not fit the last layer's {out_dim} units",
                            f"spec.model.layers[{last_layer}].units")
        onehot: np.ndarray = np.eye(out_dim, dtype="float32")[yi]
        return onehot
    y = y.astype("float32")
    if y.ndim == 1 and out_dim == 1:
        y = y.reshape(-1, 1)
    return y


def _class_weight(y: np.ndarray, loss: str) -> dict[int, float] | None:
    """`balanced`: n / (k * count_c), as scikit-learn defines it."""
    if loss not in CLASSIFICATION:
        raise SpecError(f"classWeight: balanced needs a classification loss, not {loss}", "spec.training.classWeight")
    labels = y.argmax(axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1).astype("int64")
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): float(len(labels) / (len(classes) * n)) for c, n in zip(classes, counts, strict=True)}


def train(job: Job, output: str | None = None, progress: ProgressFn | None = None,
          cluster: distributed.Cluster | None = None, strategy: Any = None) -> dict[str, Any]:
    """Train the built-in model of `job` and write its outputs; returns the result (as in result.json)."""
    import keras
    import tensorflow as tf

    spec = job.typed
    if spec.dataset is None or spec.model is None:
        raise SpecError("the built-in trainer needs spec.dataset and spec.model (or set spec.command)", "spec")
    cluster = cluster or distributed.setup()
    strategy = strategy or distributed.strategy(cluster)
    tr_spec = spec.training
    epochs, loss, metric_names = tr_spec.epochs, tr_spec.loss, list(tr_spec.metrics)

    loc, local_dir = outputs.resolve_output(job, output)
    out = Output(loc, local_dir, cluster.chief)
    out.prepare()
    try:
        clock = time.perf_counter()
        timings: dict[str, float] = {}
        digest = checkpoint.spec_hash(job.spec)
        out.pull_checkpoints()
        resumed = checkpoint.latest(out.shared_checkpoints, digest)
        seed = _seed(job, cluster, resumed)
        keras.utils.set_random_seed(seed)
        if tr_spec.seed is not None:
            tf.config.experimental.enable_op_determinism()
        ds = _load_dataset(job)
        timings["data"], clock = time.perf_counter() - clock, time.perf_counter()
        x_tr, y_tr_raw, x_val, y_val_raw = _split(ds, spec.dataset.validation_split, seed)
        state = (preprocess.PreprocessState.from_json(resumed.preprocess) if resumed
                 else preprocess.fit(x_tr, spec.dataset.preprocessing))
        models, y_tr, y_val = _compile(spec, strategy, state, y_tr_raw, y_val_raw, seed, metric_names, resumed)
        start = resumed.epoch if resumed else 0
        if resumed is None:  # a fresh run: curves of an earlier run in the same place would overlap
            storage.rmtree_quiet(out.logs)
        if resumed:
            print(f"resuming from checkpoint: {start} of {epochs} epochs done", flush=True)
        reporter = ProgressReporter(epochs, StatusPatcher.from_env(), progress, cluster.chief,
                                    prefix="" if cluster.chief else f"[worker {cluster.index}] ")
        callbacks, ckpt = _callbacks(tr_spec, resumed, out, digest, seed, state, reporter)
        if start < epochs and not (resumed and resumed.stopped):
            _fit(tf, models, cluster, strategy, (x_tr, y_tr), (x_val, y_val), tr_spec, loss, seed, start, callbacks)
        timings["fit"], clock = time.perf_counter() - clock, time.perf_counter()
        history = ckpt.history
        done = len(next(iter(history.values()), []))
        if not history or done == 0:
            raise DataError("training ran no epochs", "spec.training.epochs")
        if not cluster.chief:
            out.finish_worker()
            return {}
        result = _export(job, out, models, history, ds, x_tr, x_val, y_val, metric_names, loss, seed, done)
        out.commit()
        timings["export"] = time.perf_counter() - clock
        _finish(out, reporter, history, done, result, timings)
        return result
    except BaseException:
        out.abort()
        raise


def _load_dataset(job: Job) -> data.Dataset:
    """The cleaned dataset (a remote one is fetched into $TMPDIR and removed once loaded)."""
    uri = job.typed.dataset.uri if job.typed.dataset else ""
    data_loc = storage.resolve(uri, job.base_dir, "spec.dataset.uri")
    fetched = storage.fetch(data_loc, "spec.dataset.uri")
    try:
        ds = data.load(fetched, uri, job.typed)
    finally:
        if data_loc.is_remote:  # the downloaded copy in $TMPDIR
            storage.rmtree_quiet(fetched.parent)
    print(ds.report.line(), flush=True)
    return ds


def _compile(spec: TrainingJobSpec, strategy: Any, state: preprocess.PreprocessState, y_tr_raw: np.ndarray,
             y_val_raw: np.ndarray, seed: int, metric_names: list[str], resumed: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """The training and inference models (preprocessing inside), compiled, restored from a checkpoint if resuming."""
    assert spec.model is not None and spec.dataset is not None  # train() checked
    model_spec, tr_spec = spec.model, spec.training
    loss = tr_spec.loss
    input_shape = [int(d) for d in model_spec.input_shape]
    with strategy.scope():
        models = model_lib.build(input_shape, model_spec.layers, preprocess.layer(state, input_shape[-1]),
                                 preprocess.augmentation(spec.dataset.preprocessing, input_shape, seed))
        out_dim = int(models.inference.output_shape[-1])
        last = len(model_spec.layers) - 1
        y_tr = _labels(y_tr_raw, loss, out_dim, last)
        y_val = _labels(y_val_raw, loss, out_dim, last)
        models.training.compile(optimizer=optimizers.build(tr_spec.optimizer), loss=loss,
                                metrics=export.metric_objects(metric_names, loss))
        if resumed is not None:
            checkpoint.restore(models.training, resumed)
    return models, y_tr, y_val


def _callbacks(tr_spec: Training, resumed: Any, out: Output, digest: str, seed: int,
               state: preprocess.PreprocessState, reporter: ProgressReporter) -> tuple[list[Any], Any]:
    """Early stopping and checkpoints (both resumable), the per-epoch log/progress, TensorBoard summaries."""
    early = None
    es = tr_spec.early_stopping
    if es is not None:
        early = checkpoint.ResumableEarlyStopping(
            resumed.early_stopping if resumed else None, monitor=es.monitor, patience=es.patience, min_delta=float(es.min_delta))
    ckpt = checkpoint.CheckpointCallback(out.checkpoints, digest, seed, state.to_json(),
                                         resumed.history if resumed else {}, early, out.push_checkpoint)
    callbacks: list[Any] = [c for c in (early, ckpt) if c is not None]
    callbacks += [EpochLogger(reporter), EpochSummaries(out.logs)]
    return callbacks, ckpt


def _fit(tf: Any, models: Any, cluster: distributed.Cluster, strategy: Any, train_xy: tuple[np.ndarray, np.ndarray],
         val_xy: tuple[np.ndarray, np.ndarray], tr_spec: Training, loss: str, seed: int, start: int,
         callbacks: list[Any]) -> None:
    (x_tr, y_tr), (x_val, y_val) = train_xy, val_xy
    epochs = tr_spec.epochs
    class_weight = _class_weight(y_tr, loss) if tr_spec.class_weight == "balanced" else None
    batch = tr_spec.batch_size
    if cluster.multi_worker:
        distributed.fix_keras_multi_worker(models.training, strategy, (x_tr[:2], y_tr[:2]))
        train_data = _distributed_data(tf, x_tr, y_tr, batch, seed)
        val_data = _distributed_data(tf, x_val, y_val, batch, None)
        models.training.fit(train_data, validation_data=val_data, epochs=epochs, initial_epoch=start,
                            class_weight=class_weight, callbacks=callbacks, verbose=0, shuffle=False)
    else:
        models.training.fit(x_tr, y_tr, validation_data=(x_val, y_val), epochs=epochs, initial_epoch=start,
                            batch_size=batch, class_weight=class_weight, callbacks=callbacks, verbose=0)


def _finish(out: Output, reporter: ProgressReporter, history: dict[str, Any], done: int, result: dict[str, Any],
            timings: dict[str, float]) -> None:
    """Drop what a finished run no longer needs, report 100 %, and log where the model is."""
    out.drop_checkpoints()
    if out.scratch:  # remote output built in a temp folder: uploaded, no longer needed
        storage.rmtree_quiet(out.dir)
    reporter.epochs = done
    reporter.report(done, {k: v[-1] for k, v in history.items()}, log_line=False)
    print(f"model: {result['modelUri']} (parity max abs diff {result['parityMaxAbsDiff']:.3g})", flush=True)
    print("timings: " + " ".join(f"{k}={v:.1f}s" for k, v in timings.items()), flush=True)


def _distributed_data(tf: Any, x: np.ndarray, y: np.ndarray, batch: int, seed: int | None) -> Any:
    """A tf.data pipeline sharded by data across workers (the global batch is `batchSize`)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if seed is not None:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.batch(batch).with_options(opts)


def _export(job: Job, out: Output, models: model_lib.Models, history: dict[str, list[float]], ds: data.Dataset,
            x_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, metric_names: list[str], loss: str,
            seed: int, done: int) -> dict[str, Any]:
    spec = job.typed
    assert spec.model is not None  # train() checked
    out_spec = spec.output
    stage = out.staging
    input_shape = [int(d) for d in spec.model.input_shape]
    onnx_path = stage / "model.onnx"
    export.to_onnx(models.inference, input_shape, out_spec.onnx.opset, onnx_path)
    diff = export.parity(models.inference, onnx_path, x_val[:PARITY_ROWS], float(out_spec.parity_tolerance))
    onnx_pred = export.onnx_predict(onnx_path, x_val)
    heldout = export.evaluate(onnx_pred, y_val, metric_names, loss) if metric_names else {}
    metrics = {k: float(v[-1]) for k, v in history.items()}
    metrics.update({f"heldout_{k}": v for k, v in heldout.items()})
    fmt_results = formats_lib.export_formats(models.inference, spec, stage, x_tr, x_val, y_val,
                                             metric_names[0] if metric_names else None, loss)
    models.inference.save(str(stage / "model.keras"))
    inputs, outs = export.tensor_info(onnx_path)
    result = {
        "metrics": metrics,
        "modelUri": out.uri("model.onnx"),
        "onnxSha256": export.sha256(onnx_path),
        "parityMaxAbsDiff": diff,
        "inputs": inputs,
        "outputs": outs,
        "formats": [f.to_json(out.uri(f.file)) for f in fmt_results],
    }
    outputs.write_json(stage / "metrics.json", metrics)
    outputs.write_json(stage / "history.json", history)
    outputs.write_json(stage / "data-report.json", ds.report.to_json())
    if ds.classes is not None:
        outputs.write_json(stage / "labels.json", ds.classes)
    outputs.plot_curves(history, stage / "training-curves.png")
    outputs.write_json(stage / outputs.RESULT, {**result, "epochsRun": done, "seed": seed})
    return result
