"""`output.formats: [keras-h5]` writes model.h5 (the article's file), preprocessing included, scored after a reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kiln_trainer import export
from support.trainer import blobs, manifest, write_csv, write_manifest

pytestmark = pytest.mark.training


def test_keras_h5_is_written_and_reloads(tmp_path: Path, kiln_train) -> None:
    import h5py
    import keras

    x, y = blobs(n=150)
    x[::7, 1] = np.nan
    write_csv(tmp_path / "data.csv", x, y)
    doc = manifest(dataset={"uri": "data.csv", "preprocessing": {"missingValues": "median", "normalization": "standard",
                                                                  "pca": {"components": 3}}},
                   output={"formats": ["onnx", "keras-h5"]})
    run = kiln_train(write_manifest(tmp_path, doc))
    assert run.code == 0, run.err
    h5 = run.output / "model.h5"
    with h5py.File(h5) as f:
        assert "model_weights" in f
    entry = next(f for f in run.result()["formats"] if f["format"] == "keras-h5")
    assert entry["file"] == "model.h5" and entry["sizeBytes"] == h5.stat().st_size and entry["delta"] == 0
    rows = x[:20].astype("float32")
    reloaded = keras.saving.load_model(h5, compile=False).predict(rows, verbose=0)
    np.testing.assert_allclose(reloaded, export.onnx_predict(run.output / "model.onnx", rows), atol=1e-5)
