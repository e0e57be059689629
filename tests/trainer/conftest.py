"""Fixtures for the trainer tests: tiny datasets, manifests, and running `kiln train` in or out of process.

TensorFlow is kept to 2 intra-op threads (the machine is shared); the env vars must be set before TF loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SUCCESS_FILES = ("model.onnx", "result.json")


def write_csv(path: Path, x: np.ndarray, y: Any, names: list[str] | None = None, label: str = "label") -> Path:
    """A CSV with a header, feature columns and the label column."""
    import pandas as pd

    names = names or [f"f{i}" for i in range(x.shape[1])]
    df = pd.DataFrame(x, columns=names)
    df[label] = y
    df.to_csv(path, index=False)
    return path


def blobs(n: int = 240, features: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable 3-class problem: class = which of three directions the point leans to."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = rng.normal(scale=3.0, size=(3, features))
    x = centers[y] + rng.normal(size=(n, features))
    return x.astype("float64"), y


def manifest(name: str = "t", **spec: Any) -> dict[str, Any]:
    """A TrainingJob document with a small default model; keyword arguments replace spec sections."""
    doc: dict[str, Any] = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"uri": "data.csv"},
            "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                    {"type": "Dense", "units": 3, "activation": "softmax"}]},
            "training": {"epochs": 2, "batchSize": 32, "seed": 1},
        },
    }
    doc["spec"].update(spec)
    return doc


def write_manifest(folder: Path, doc: dict[str, Any], name: str = "tj.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Run:
    """The outcome of one `kiln train`: exit code, captured output, termination message and output folder."""

    code: int
    out: str
    err: str
    termination: dict[str, Any] | None
    output: Path

    def result(self) -> dict[str, Any]:
        return json.loads((self.output / "result.json").read_text())

    def left_model(self) -> list[str]:
        return [n for n in SUCCESS_FILES if (self.output / n).exists()]


@pytest.fixture
def kiln_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run `kiln train` in this process (TF stays loaded between tests: fast) with a termination log file."""
    from kiln_trainer.__main__ import main

    def run(manifest_path: Path, output: Path | None = None, extra: list[str] | None = None,
            env: dict[str, str] | None = None, spec_output: bool = False) -> Run:
        """`spec_output=True`: no --output, the spec's output.uri is used (Run.output is then unused)."""
        output = output or manifest_path.parent / "out"
        term = manifest_path.parent / "termination-log"
        term.unlink(missing_ok=True)
        monkeypatch.setenv("KILN_TERMINATION_LOG", str(term))
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = main([str(manifest_path), *([] if spec_output else ["--output", str(output)]), *(extra or [])])
        cap = capsys.readouterr()
        message = json.loads(term.read_text()) if term.exists() and term.read_text() else None
        return Run(code, cap.out, cap.err, message, output)

    return run


@pytest.fixture(autouse=True)
def _fresh_keras() -> Iterator[None]:
    """Each test starts with an empty Keras graph/name scope (models do not pile up in memory)."""
    yield
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session()


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `kiln train` child processes: quiet TF, 1 thread each, no stray cluster settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "TF_CONFIG", "KUBERNETES_"))}
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


KILN = [sys.executable, "-m", "kiln.cli"]


def popen_train(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start `kiln train ARGS` with stdout piped line by line (stderr merged)."""
    return subprocess.Popen([*KILN, "train", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
