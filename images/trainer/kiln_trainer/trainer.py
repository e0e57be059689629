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
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.spec import Training, TrainingJobSpec
from kiln_trainer import (
    balance,
    checkpoint,
    data,
    distributed,
    explain,
    export,
    features,
    mixup,
    optimizers,
    outputs,
    preprocess,
    schedules,
    storage,
    tuning,
)
from kiln_trainer import formats as formats_lib
from kiln_trainer import model as model_lib
from kiln_trainer.errors import DataError, SpecError
from kiln_trainer.jobspec import Job
from kiln_trainer.outputs import Output
from kiln_trainer.progress import EpochLogger, EpochSummaries, ProgressFn, ProgressReporter, StatusPatcher

log = logging.getLogger("kiln_trainer")
PARITY_ROWS = 1024
# Training steps per call into TensorFlow: every callback here runs per epoch, so nothing needs Python
# between batches, and 64 steps per call take 30 % less CPU than one on the reference MLP (batch 32)
# with bit-identical weights (the same steps in the same order). Multi-worker runs keep 1 (the Keras
# workarounds in distributed.py are made for it).
STEPS_PER_EXECUTION = 64


class Clock:
    """Wall and CPU seconds per phase of one run, printed as the `timings:` and `cpu timings:` lines.

    Why both: on a shared machine wall time swings with other people's load, CPU time much less;
    bench/train_overhead.py compares each phase with a plain Keras script's. `startup` (CPU only) is
    what the process spent before this run began: interpreter, imports, reading the manifest (in a
    tuning search also the trials before).
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {"startup": time.process_time()}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (a phase that recurs adds up)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[phase] = self.wall.get(phase, 0.0) + wall - self._wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def lines(self) -> list[str]:
        """The two log lines, in the order the phases ran (the format the bench parses: `name=1.23s`)."""
        return ["timings: " + " ".join(f"{k}={v:.2f}s" for k, v in self.wall.items()),
                "cpu timings: " + " ".join(f"{k}={v:.2f}s" for k, v in self.cpu.items())]


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


@dataclass
class Fitted:
    """Everything fitted on the training split that becomes part of the exported graph."""

    pre: preprocess.PreprocessState
    feats: features.FeatureState

    def to_json(self) -> dict[str, Any]:
        return {**self.pre.to_json(), "features": self.feats.to_json()}

    def layers(self, raw_width: int) -> list[Any]:
        """Select columns -> impute/normalize -> PCA, the layers in front of the model's own."""
        before, after = features.layers(self.feats)
        width = len(self.feats.keep) if self.feats.keep is not None else raw_width
        core = preprocess.layer(self.pre, width)
        return [*before, *([core] if core is not None else []), *after]


def _fit_preprocessing(spec: TrainingJobSpec, x_tr: np.ndarray, names: list[str], resumed: Any) -> Fitted:
    """Selection, imputation/normalization and PCA fitted on the training rows (or restored on resume)."""
    assert spec.dataset is not None and spec.model is not None  # train() checked
    pp = spec.dataset.preprocessing
    features.check_input(pp, [int(d) for d in spec.model.input_shape])
    explain.check(spec)
    if resumed is not None:
        return Fitted(preprocess.PreprocessState.from_json(resumed.preprocess),
                      features.FeatureState.from_json(resumed.preprocess.get("features")))
    feats = features.fit_selection(x_tr, pp, names) if features.wanted(pp) else features.FeatureState(None, {})
    x_sel = features.select(feats, x_tr)
    state = preprocess.fit(x_sel, pp)
    if pp.pca is not None:
        feats = features.fit_pca(feats, state.transform(x_sel), pp)
    return Fitted(state, feats)


def _explain(onnx_path: Any, x_val: np.ndarray, y_val: np.ndarray, names: list[str], metric_names: list[str],
             loss: str, seed: int) -> dict[str, Any]:
    """Permutation importance by the first metric (accuracy or mse when the spec lists none)."""
    classify = loss.endswith("crossentropy")
    metric = metric_names[0] if metric_names else ("accuracy" if classify else "mse")
    return explain.importance(onnx_path, x_val, y_val, names, metric, loss, seed)


def _check_finite(history: dict[str, list[float]]) -> None:
    """A loss that became NaN/inf means training diverged: fail with advice instead of exporting garbage."""
    for i, value in enumerate(history.get("loss", [])):
        if not np.isfinite(value):
            raise SpecError(f"training diverged: the loss became {value} in epoch {i + 1}; lower learningRate, "
                            "set clipNorm/clipValue or add BatchNormalization", "spec.training.optimizer")


def train(job: Job, output: str | None = None, progress: ProgressFn | None = None,
          cluster: distributed.Cluster | None = None, strategy: Any = None,
          tuning_summary: dict[str, Any] | None = None, patch_progress: bool = True) -> dict[str, Any]:
    """Train the built-in model of `job` and write its outputs; returns the result (as in result.json).

    With `spec.tuning` this runs the search (tuning.py), which calls back here once per trial and
    once more for the best one (`tuning_summary` is then written next to the model as tuning.json);
    a parallel trial's pod trains with `patch_progress=False` (the pods would overwrite each other's progress).
    """
    import keras
    import tensorflow as tf

    spec = job.typed
    if spec.dataset is None or spec.model is None:
        raise SpecError("the built-in trainer needs spec.dataset and spec.model (or set spec.command)", "spec")
    cluster = cluster or distributed.setup()
    strategy = strategy or distributed.strategy(cluster)
    if spec.tuning is not None:
        return tuning.run(job, train, output, progress, cluster, strategy)
    tr_spec = spec.training
    epochs, loss, metric_names = tr_spec.epochs, tr_spec.loss, list(tr_spec.metrics)

    loc, local_dir = outputs.resolve_output(job, output)
    out = Output(loc, local_dir, cluster.chief)
    out.prepare()
    try:
        clock = Clock()
        digest = checkpoint.spec_hash(job.spec)
        out.pull_checkpoints()
        resumed = checkpoint.latest(out.shared_checkpoints, digest)
        seed = _seed(job, cluster, resumed)
        keras.utils.set_random_seed(seed)
        if tr_spec.seed is not None:
            tf.config.experimental.enable_op_determinism()
        clock.lap("setup")
        ds = _load_dataset(job)
        clock.lap("data")
        x_tr, y_tr_raw, x_val, y_val_raw = _split(ds, spec.dataset.validation_split, seed)
        fitted = _fit_preprocessing(spec, x_tr, ds.report.features, resumed)
        models, y_tr, y_val = _compile(spec, strategy, fitted, (y_tr_raw, y_val_raw), seed, metric_names, resumed,
                                       1 if cluster.multi_worker else STEPS_PER_EXECUTION)
        balanced = balance.apply(spec, x_tr, y_tr, loss, seed)
        if balanced.report:
            print(balanced.line(), flush=True)
        start = resumed.epoch if resumed else 0
        if resumed is None:  # a fresh run: curves of an earlier run in the same place would overlap
            storage.rmtree_quiet(out.logs)
        if resumed:
            print(f"resuming from checkpoint: {start} of {epochs} epochs done", flush=True)
        reporter = ProgressReporter(epochs, StatusPatcher.from_env() if patch_progress else None, progress, cluster.chief,
                                    prefix="" if cluster.chief else f"[worker {cluster.index}] ")
        callbacks, ckpt = _callbacks(tr_spec, resumed, out, digest, seed, fitted, reporter)
        clock.lap("prepare")
        if start < epochs and not (resumed and resumed.stopped):
            _fit(tf, models, cluster, strategy, balanced, (x_val, y_val), spec, seed, start, callbacks)
        clock.lap("fit")
        history = ckpt.history
        _check_finite(history)
        done = len(next(iter(history.values()), []))
        if not history or done == 0:
            raise DataError("training ran no epochs", "spec.training.epochs")
        if not cluster.chief:
            out.finish_worker()
            return {}
        ds.report.extra = {**fitted.feats.report(), **({"balance": balanced.report} if balanced.report else {})}
        result = _export(job, out, models, history, ds, x_tr, x_val, y_val, metric_names, loss, seed, done, clock)
        if tuning_summary is not None:
            outputs.write_json(out.staging / "tuning.json", tuning_summary)
        out.commit()
        _finish(out, reporter, history, done, result, clock)
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


def _compile(spec: TrainingJobSpec, strategy: Any, fitted: Fitted, ys: tuple[np.ndarray, np.ndarray], seed: int,
             metric_names: list[str], resumed: Any, steps_per_execution: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """The training and inference models (preprocessing inside), compiled, restored from a checkpoint if resuming."""
    assert spec.model is not None and spec.dataset is not None  # train() checked
    y_tr_raw, y_val_raw = ys
    model_spec, tr_spec = spec.model, spec.training
    loss = tr_spec.loss
    input_shape = [int(d) for d in model_spec.input_shape]
    with strategy.scope():
        models = model_lib.build(input_shape, model_spec.layers, fitted.layers(input_shape[-1]),
                                 preprocess.augmentation(spec.dataset.preprocessing, input_shape, seed))
        out_dim = int(models.inference.output_shape[-1])
        last = len(model_spec.layers) - 1
        y_tr = _labels(y_tr_raw, loss, out_dim, last)
        y_val = _labels(y_val_raw, loss, out_dim, last)
        models.training.compile(optimizer=optimizers.build(tr_spec.optimizer), loss=loss,
                                metrics=export.metric_objects(metric_names, loss), steps_per_execution=steps_per_execution)
        if resumed is not None:
            checkpoint.restore(models.training, resumed)
    return models, y_tr, y_val


def _callbacks(tr_spec: Training, resumed: Any, out: Output, digest: str, seed: int,
               fitted: Fitted, reporter: ProgressReporter) -> tuple[list[Any], Any]:
    """The learning rate, early stopping and checkpoints (resumable), the per-epoch log/progress, TensorBoard."""
    early = None
    es = tr_spec.early_stopping
    if es is not None:
        early = checkpoint.ResumableEarlyStopping(
            resumed.early_stopping if resumed else None, monitor=es.monitor, patience=es.patience, min_delta=float(es.min_delta))
    ckpt = checkpoint.CheckpointCallback(out.checkpoints, digest, seed, fitted.to_json(),
                                         resumed.history if resumed else {}, early, out.push_checkpoint)
    rate = schedules.LearningRateCallback(schedules.parse(tr_spec), ckpt.history)
    callbacks: list[Any] = [c for c in (rate, schedules.StopOnDivergence(), early, ckpt) if c is not None]
    callbacks += [EpochLogger(reporter), EpochSummaries(out.logs)]
    return callbacks, ckpt


def _fit(tf: Any, models: Any, cluster: distributed.Cluster, strategy: Any, train: balance.Balanced,
         val_xy: tuple[np.ndarray, np.ndarray], spec: TrainingJobSpec, seed: int, start: int,
         callbacks: list[Any]) -> None:
    (x_tr, y_tr), (x_val, y_val), class_weight = (train.x, train.y), val_xy, train.class_weight
    tr_spec = spec.training
    epochs, batch = tr_spec.epochs, tr_spec.batch_size
    mix = mixup.alpha(spec.dataset.preprocessing.augmentation if spec.dataset else None, tr_spec.loss)
    if cluster.multi_worker:
        distributed.fix_keras_multi_worker(models.training, strategy, (x_tr[:2], y_tr[:2]))
        train_data = (mixup.dataset(tf, x_tr, y_tr, batch, mix, seed, class_weight) if mix
                      else _distributed_data(tf, x_tr, y_tr, batch, seed))
        models.training.fit(_sharded(tf, train_data), validation_data=_distributed_data(tf, x_val, y_val, batch, None),
                            epochs=epochs, initial_epoch=start, class_weight=None if mix else class_weight,
                            callbacks=callbacks, verbose=0, shuffle=False)
    elif mix:
        models.training.fit(mixup.dataset(tf, x_tr, y_tr, batch, mix, seed, class_weight),
                            validation_data=(x_val, y_val), validation_batch_size=batch, epochs=epochs,
                            initial_epoch=start, callbacks=callbacks, verbose=0)
    else:
        models.training.fit(x_tr, y_tr, validation_data=(x_val, y_val), epochs=epochs, initial_epoch=start,
                            batch_size=batch, class_weight=class_weight, callbacks=callbacks, verbose=0)


def _finish(out: Output, reporter: ProgressReporter, history: dict[str, Any], done: int, result: dict[str, Any],
            clock: Clock) -> None:
    """Drop what a finished run no longer needs, report 100 %, and log where the model is."""
    out.drop_checkpoints()
    if out.scratch:  # remote output built in a temp folder: uploaded, no longer needed
        storage.rmtree_quiet(out.dir)
    reporter.epochs = done
    reporter.report(done, {k: v[-1] for k, v in history.items()}, log_line=False)
    print(f"model: {result['modelUri']} (parity max abs diff {result['parityMaxAbsDiff']:.3g})", flush=True)
    clock.lap("commit")
    for line in clock.lines():
        print(line, flush=True)


def _distributed_data(tf: Any, x: np.ndarray, y: np.ndarray, batch: int, seed: int | None) -> Any:
    """A tf.data pipeline sharded by data across workers (the global batch is `batchSize`)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if seed is not None:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return _sharded(tf, dataset.batch(batch))


def _sharded(tf: Any, dataset: Any) -> Any:
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(opts)


def _export(job: Job, out: Output, models: model_lib.Models, history: dict[str, list[float]], ds: data.Dataset,
            x_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, metric_names: list[str], loss: str,
            seed: int, done: int, clock: Clock) -> dict[str, Any]:
    spec = job.typed
    assert spec.model is not None  # train() checked
    out_spec = spec.output
    stage = out.staging
    input_shape = [int(d) for d in spec.model.input_shape]
    onnx_path = stage / "model.onnx"
    export.to_onnx(models.inference, input_shape, out_spec.onnx.opset, onnx_path)
    clock.lap("onnx")
    # One Keras and one ONNX Runtime pass over the held-out rows serve the parity check (its first
    # PARITY_ROWS rows), the held-out metrics and the float onnx entry of `formats` (whose Keras
    # baseline needs every held-out row only when there is a metric to compare).
    keras_rows = x_val if metric_names else x_val[:PARITY_ROWS]
    keras_pred = np.asarray(models.inference(keras_rows.astype("float32"), training=False))
    onnx_pred = export.onnx_predict(onnx_path, x_val)
    diff = export.check_parity(keras_pred[:PARITY_ROWS], onnx_pred[:PARITY_ROWS], float(out_spec.parity_tolerance))
    heldout = export.evaluate(onnx_pred, y_val, metric_names, loss) if metric_names else {}
    clock.lap("parity")
    metrics = {k: float(v[-1]) for k, v in history.items() if k != schedules.LR_KEY}
    metrics.update({f"heldout_{k}": v for k, v in heldout.items()})
    fmt_results = formats_lib.export_formats(models.inference, spec, stage, x_tr, x_val, y_val,
                                             metric_names[0] if metric_names else None, loss,
                                             {"keras": keras_pred, "onnx": onnx_pred} if metric_names else {"onnx": onnx_pred})
    clock.lap("formats")
    models.inference.save(str(stage / "model.keras"))
    clock.lap("save")
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
    clock.lap("plot")
    if out_spec.explain:
        ranked = _explain(onnx_path, x_val, y_val, ds.report.features, metric_names, loss, seed)
        outputs.write_json(stage / "explanations.json", ranked)
        explain.plot(ranked, stage / "explanations.png")
        result["topFeatures"] = explain.top(ranked)
    outputs.write_json(stage / outputs.RESULT, {**result, "epochsRun": done, "seed": seed})
    return result
