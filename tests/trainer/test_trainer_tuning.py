"""spec.tuning: a grid over learning rate and units on digits, trials in this process, the best exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kiln_trainer import tuning
from kiln_trainer.errors import SpecError
from support.progress_server import ProgressServer
from support.trainer import EXAMPLES, manifest, write_manifest

from kiln.spec import Tuning

pytestmark = pytest.mark.training


def test_grid_picks_the_best_and_records_every_trial(tmp_path: Path, kiln_train) -> None:
    doc = manifest(dataset={"uri": str(EXAMPLES / "digits" / "digits.csv"), "preprocessing": {"normalization": "standard"}},
                   training={"epochs": 2, "batchSize": 64, "seed": 5},
                   tuning={"algorithm": "grid", "metric": "val_accuracy",
                           "parameters": {"training.optimizer.learningRate": [0.0003, 0.01],
                                          "model.layers[0].units": [2, 32]}})
    doc["spec"]["model"] = {"inputShape": [64], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                            {"type": "Dense", "units": 10, "activation": "softmax"}]}
    with ProgressServer() as server:
        run = kiln_train(write_manifest(tmp_path, doc),
                         env={"KILN_TRAININGJOB": "t", "KILN_NAMESPACE": "ns", "KILN_API_SERVER": server.url})
    assert run.code == 0, run.err
    summary = json.loads((run.output / "tuning.json").read_text())
    trials = summary["trials"]
    assert [t["parameters"] for t in trials] == [  # paths in sorted order, as the API server stores them
        {"model.layers[0].units": u, "training.optimizer.learningRate": lr} for u in (2, 32) for lr in (0.0003, 0.01)]
    scores = [t["score"] for t in trials]
    assert scores == [t["metrics"]["val_accuracy"] for t in trials] and len(set(scores)) > 1
    best = max(range(4), key=lambda i: scores[i])
    assert summary["best"] == best and summary["bestScore"] == scores[best]
    assert summary["bestParameters"] == {"training.optimizer.learningRate": 0.01, "model.layers[0].units": 32}
    # The exported model is the best trial trained again: same seed, same numbers.
    assert run.result()["metrics"]["val_accuracy"] == pytest.approx(scores[best])
    patches = [r["body"]["status"]["tuning"] for r in server.requests if "tuning" in r["body"]["status"]]
    assert [len(p["trials"]) for p in patches] == [1, 2, 3, 4] and patches[-1] == summary
    assert sum(ln.startswith("trial ") for ln in run.out.splitlines()) == 4


def test_random_plan_is_seeded_and_paths_are_checked() -> None:
    t = {"algorithm": "random", "trials": 6, "parameters": {"training.optimizer.learningRate": {"min": 1e-4, "max": 1e-1,
                                                                                                  "log": True},
                                                            "model.layers[0].units": {"min": 4, "max": 64}}}
    first, again = tuning.plan(Tuning.from_dict(t), 3), tuning.plan(Tuning.from_dict(t), 3)
    assert first == again and len(first) == 6
    assert all(1e-4 <= p["training.optimizer.learningRate"] <= 0.1 for p in first)
    assert all(isinstance(p["model.layers[0].units"], int) and 4 <= p["model.layers[0].units"] <= 64 for p in first)
    spec = {"model": {"layers": [{"units": 1}]}, "training": {}}
    tuning.set_path(spec, "model.layers[0].units", 9)
    tuning.set_path(spec, "training.optimizer.learningRate", 0.1)
    assert spec == {"model": {"layers": [{"units": 9}]}, "training": {"optimizer": {"learningRate": 0.1}}}
    for path, words in (("model.layers[3].units", "no item [3]"), ("dataset.uri", "start with model.")):
        with pytest.raises(SpecError, match=words.replace("[", r"\[").replace(".", r"\.")) as e:
            tuning.set_path(spec, path, 1)
        assert e.value.field == f"spec.tuning.parameters[{path}]"
    with pytest.raises(SpecError, match="grid has 4 combinations"):
        tuning.plan(Tuning.from_dict({"trials": 2, "parameters": {"a.b": [1, 2], "a.c": [3, 4]}}), 0)
    with pytest.raises(SpecError, match="grid search needs a list"):
        tuning.plan(Tuning.from_dict({"parameters": {"training.epochs": {"min": 1, "max": 3}}}), 0)


def test_a_trial_value_the_schema_rejects_fails_before_training(tmp_path: Path, kiln_train) -> None:
    doc = manifest(tuning={"parameters": {"training.optimizer.learningRate": [0.01, -1]}})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 2 and run.termination["field"] == "spec.tuning"
    assert "trial {'training.optimizer.learningRate': -1}" in run.termination["error"]
    assert "epoch " not in run.out


def test_a_parallel_trial_pod_and_the_final_run(tmp_path: Path, kiln_train) -> None:
    """What the operator's trial pods and final Job run: trial i alone (KILN_TRIAL_INDEX), then the best (KILN_TUNING_BEST)."""
    from kiln import tuning as core
    from kiln.schema import validate

    doc = manifest(dataset={"uri": str(EXAMPLES / "digits" / "digits.csv"), "preprocessing": {"normalization": "standard"}},
                   training={"epochs": 2, "batchSize": 64},  # no seed: every pod derives it from the uid
                   tuning={"algorithm": "random", "trials": 3, "metric": "val_loss", "parallelism": 2,
                           "parameters": {"training.optimizer.learningRate": {"min": 1e-3, "max": 3e-2, "log": True}}})
    doc["metadata"]["uid"] = "0c7e-uid"
    doc["spec"]["model"] = {"inputShape": [64], "layers": [{"type": "Dense", "units": 16, "activation": "relu"},
                                                            {"type": "Dense", "units": 10, "activation": "softmax"}]}
    path = write_manifest(tmp_path, doc)
    plan = core.plan(Tuning.from_dict(validate(doc)["spec"]["tuning"]), core.derived_seed("0c7e-uid"))
    with ProgressServer() as server:
        trial = kiln_train(path, output=tmp_path / "trial", env={"KILN_TRIAL_INDEX": "1", "KILN_TRAININGJOB": "t",
                                                                 "KILN_NAMESPACE": "ns", "KILN_API_SERVER": server.url})
        assert trial.code == 0, trial.err
        assert not server.requests, "parallel trial pods do not patch status (the operator writes status.tuning)"
    report = trial.termination
    assert report is not None and report["trial"] == 1 and report["parameters"] == plan[1]
    assert report["score"] == report["metrics"]["val_loss"] and "error" not in report
    assert not (tmp_path / "trial" / "model.onnx").exists(), "a trial trains into a scratch folder"
    assert [ln for ln in trial.out.splitlines() if ln.startswith("trial ")] == [
        f"trial 2/3 {plan[1]} val_loss={report['score']:.4f}"]

    final = kiln_train(path, output=tmp_path / "final", env={"KILN_TRIAL_INDEX": "", "KILN_TUNING_BEST": "1"})
    assert final.code == 0, final.err
    assert final.result()["metrics"]["val_loss"] == pytest.approx(report["score"]), "same seed, same values: same numbers"
    summary = json.loads((final.output / "tuning.json").read_text())
    assert (summary["best"], summary["bestParameters"], summary["parallelism"]) == (1, plan[1], 2)

    out_of_range = kiln_train(path, env={"KILN_TUNING_BEST": "", "KILN_TRIAL_INDEX": "3"})
    assert out_of_range.code == 2 and "the search has 3 trials" in out_of_range.termination["error"]


def test_a_trial_that_fails_for_its_values_is_reported_not_raised(tmp_path: Path, kiln_train) -> None:
    doc = manifest(tuning={"parallelism": 2, "parameters": {"training.optimizer.learningRate": [0.01, -1]}})
    run = kiln_train(write_manifest(tmp_path, doc), env={"KILN_TRIAL_INDEX": "1"})
    assert run.code == 0, "the pod succeeds so an Indexed Job goes on; the operator records the trial as failed"
    assert run.termination["trial"] == 1 and run.termination["field"] == "spec.tuning"
    assert "trial {'training.optimizer.learningRate': -1}" in run.termination["error"] and "epoch " not in run.out
