"""The examples for schedules/regularization, feature reduction, augmentation and imbalance train as written (epochs cut to 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from support.trainer import EXAMPLES, example_module, write_manifest

pytestmark = pytest.mark.training


@pytest.mark.parametrize("example", ["digits/regularized.yaml", "digits/reduced.yaml", "digits/augmented.yaml",
                                     "imbalanced/trainingjob.yaml"])
def test_example_trains(tmp_path: Path, kiln_train, example: str) -> None:
    src = EXAMPLES / example
    if src.parent.name == "imbalanced":
        example_module("imbalanced").make(tmp_path)
    else:
        shutil.copy(src.parent / "digits.csv", tmp_path / "digits.csv")
    doc = yaml.safe_load(src.read_text())
    doc["spec"]["training"]["epochs"] = 2
    if doc["spec"]["training"].get("learningRateSchedule", {}).get("warmupEpochs"):
        doc["spec"]["training"]["learningRateSchedule"]["warmupEpochs"] = 1
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err
    assert run.result()["metrics"]["heldout_accuracy"] > 0.6
