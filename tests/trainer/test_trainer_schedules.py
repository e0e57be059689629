"""Learning-rate schedules, gradient clipping, kernel initializers and regularizers, with real training on digits."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import model as model_lib
from kiln_trainer import optimizers, schedules
from kiln_trainer.errors import SpecError
from support.trainer import EXAMPLES, manifest, write_manifest

from kiln.spec import Layer, Optimizer, Training

pytestmark = pytest.mark.training
DIGITS = EXAMPLES / "digits" / "digits.csv"


def _digits_job(layers: list[dict], training: dict, normalization: str = "standard") -> dict:
    doc = manifest(training={"epochs": 3, "batchSize": 64, "seed": 1, **training},
                   dataset={"uri": str(DIGITS), "preprocessing": {"normalization": normalization}})
    doc["spec"]["model"] = {"inputShape": [64], "layers": layers}
    return doc


def _train(tmp_path: Path, kiln_train, name: str, doc: dict):
    folder = tmp_path / name
    folder.mkdir()
    return kiln_train(write_manifest(folder, doc))


def test_each_schedule_follows_its_formula() -> None:
    base = {"epochs": 8, "optimizer": {"learningRate": 0.1}}

    def rates(sched: dict, history: dict | None = None) -> list[float]:
        s = schedules.parse(Training.from_dict({**base, "learningRateSchedule": sched}))
        return [s.rate(e, history or {}) for e in range(8)]

    assert rates({"type": "constant"}) == [0.1] * 8
    assert rates({"type": "constant", "warmupEpochs": 3})[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates({"type": "exponential", "decayRate": 0.5, "decaySteps": 2}) == pytest.approx(
        [0.1 * 0.5 ** (e / 2) for e in range(8)])
    assert rates({"type": "step", "decayRate": 0.1, "decaySteps": 3}) == pytest.approx(
        [0.1] * 3 + [0.01] * 3 + [0.001] * 2)
    assert rates({"type": "step", "decayRate": 0.1, "decaySteps": 1, "minLearningRate": 0.0005})[-1] == 0.0005
    cos = rates({"type": "cosine", "minLearningRate": 0.01, "warmupEpochs": 2})
    assert cos[2] == pytest.approx(0.1) and cos[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(a > b for a, b in itertools.pairwise(cos[2:]))
    # plateau: val_loss improves twice, then stalls; after `patience` stalled epochs the rate is halved.
    hist = {"val_loss": [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 0.5, 0.6]}
    assert rates({"type": "plateau", "patience": 2, "factor": 0.5}, hist) == pytest.approx(
        [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


@pytest.mark.parametrize(("sched", "field", "words"), [
    ({"type": "cosine", "factor": 0.5}, "factor", "does not take 'factor'"),
    ({"type": "plateau", "decayRate": 0.5}, "decayRate", "does not take 'decayRate'"),
    ({"type": "exponential", "minLearningRate": 0.5}, "minLearningRate", "not below"),
    ({"type": "constant", "warmupEpochs": 8}, "warmupEpochs", "leaves no epoch"),
])
def test_schedule_errors_name_the_field(sched: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        schedules.parse(Training.from_dict({"epochs": 8, "optimizer": {"learningRate": 0.1}, "learningRateSchedule": sched}))
    assert e.value.field == f"spec.training.learningRateSchedule.{field}" and words in str(e.value)


def test_schema_rejects_bad_schedule_and_both_clippings() -> None:
    from kiln.schema import ManifestError, validate

    for training in ({"learningRateSchedule": {"type": "linear"}},
                     {"learningRateSchedule": {"type": "plateau", "factor": 1.5}},
                     {"optimizer": {"clipNorm": 1.0, "clipValue": 0.5}},
                     {"optimizer": {"clipNorm": 0}}):
        with pytest.raises(ManifestError):
            validate(manifest(training=training), "TrainingJob")
    with pytest.raises(SpecError, match="clipNorm or clipValue, not both"):
        optimizers.build(Optimizer.from_dict({"clipNorm": 1.0, "clipValue": 0.5}))
    assert optimizers.build(Optimizer.from_dict({"name": "sgd", "clipValue": 0.5})).clipvalue == 0.5


def test_recorded_rate_is_the_one_trained_with(tmp_path: Path, kiln_train) -> None:
    layers = [{"type": "Dense", "units": 16, "activation": "relu"}, {"type": "Dense", "units": 10, "activation": "softmax"}]
    sched = {"type": "step", "warmupEpochs": 1, "decayRate": 0.5, "decaySteps": 1, "minLearningRate": 0.001}
    run = _train(tmp_path, kiln_train, "step", _digits_job(layers, {
        "epochs": 4, "optimizer": {"name": "sgd", "learningRate": 0.008}, "learningRateSchedule": sched}))
    assert run.code == 0, run.err
    history = json.loads((run.output / "history.json").read_text())
    assert history["learning_rate"] == pytest.approx([0.004, 0.008, 0.004, 0.002])
    assert "learning_rate=0.004" in next(ln for ln in run.out.splitlines() if ln.startswith("epoch 1/4"))
    assert "learning_rate" not in json.loads((run.output / "metrics.json").read_text())
    assert (run.output / "training-curves.png").stat().st_size > 10_000

    plateau = {"type": "plateau", "patience": 1, "factor": 0.1}
    run = _train(tmp_path, kiln_train, "plateau", _digits_job(layers, {
        "epochs": 6, "optimizer": {"learningRate": 0.3}, "learningRateSchedule": plateau}))
    assert run.code == 0, run.err
    history = json.loads((run.output / "history.json").read_text())
    expected = schedules.parse(Training.from_dict({"epochs": 6, "optimizer": {"learningRate": 0.3},
                                                          "learningRateSchedule": plateau}))
    assert history["learning_rate"] == pytest.approx([expected.rate(e, history) for e in range(6)], rel=1e-6)
    assert min(history["learning_rate"]) < 0.3  # adam at 0.3 stalls on val_loss: the rule did cut the rate


def test_clipping_turns_a_diverging_run_into_a_converging_one(tmp_path: Path, kiln_train) -> None:
    """Deep relu MLP, raw pixels 0..16, SGD with momentum at learning rate 1: the loss is NaN in the first epoch."""
    deep = [{"type": "Dense", "units": 32, "activation": "relu"}] * 6 + [
        {"type": "Dense", "units": 10, "activation": "softmax"}]
    opt = {"name": "sgd", "learningRate": 1.0, "momentum": 0.9}
    run = _train(tmp_path, kiln_train, "unclipped", _digits_job(deep, {"optimizer": opt}, "none"))
    assert run.code == 2
    assert run.termination["field"] == "spec.training.optimizer"
    assert "training diverged: the loss became nan in epoch 1" in run.termination["error"]
    assert run.left_model() == []
    run = _train(tmp_path, kiln_train, "clipped",
                 _digits_job(deep, {"optimizer": {**opt, "clipNorm": 1.0}}, "none"))
    assert run.code == 0, run.err
    history = json.loads((run.output / "history.json").read_text())
    assert all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]


def test_l2_shrinks_the_weights(tmp_path: Path, kiln_train) -> None:
    import keras

    def norm(reg: dict | None) -> float:
        extra = {"kernelRegularizer": reg} if reg else {}
        layers = [{"type": "Dense", "units": 32, "activation": "relu", **extra},
                  {"type": "Dense", "units": 10, "activation": "softmax", **extra}]
        run = _train(tmp_path, kiln_train, "l2" if reg else "plain", _digits_job(layers, {"epochs": 4}))
        assert run.code == 0, run.err
        model = keras.saving.load_model(run.output / "model.keras")
        return float(np.sqrt(sum((w**2).sum() for w in (lay.kernel.numpy() for lay in model.layers
                                                         if isinstance(lay, keras.layers.Dense)))))

    plain, shrunk = norm(None), norm({"l2": 0.05})
    print(f"kernel norm: plain {plain:.3f}, l2 {shrunk:.3f}")
    assert shrunk < 0.8 * plain


def test_kernel_initializer_and_regularizer_reach_the_layers() -> None:
    import keras

    layers = [{"type": "Dense", "units": 4, "kernelInitializer": "ones", "kernelRegularizer": {"l1": 0.1}},
              {"type": "Dense", "units": 2, "kernelInitializer": "he_normal"}]
    models = model_lib.build([3], [Layer.from_dict(x) for x in layers], None, [])
    first, second = (lay for lay in models.inference.layers if isinstance(lay, keras.layers.Dense))
    assert (first.kernel.numpy() == 1).all() and first.kernel_regularizer.l1 == pytest.approx(0.1)
    assert isinstance(second.kernel_initializer, keras.initializers.HeNormal)
    with pytest.raises(SpecError, match="does not take 'kernelInitializer'") as e:
        model_lib.build([3], [Layer.from_dict({"type": "Dropout", "rate": 0.1, "kernelInitializer": "ones"})], None, [])
    assert e.value.field == "spec.model.layers[0].kernelInitializer"
