"""The trainer tests' helpers: tiny datasets, TrainingJob manifests, and `kiln train` as a child process.

Importing this module loads no TensorFlow (tests/trainer/conftest.py sets its thread counts first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

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


def example_module(folder: str, name: str = "make_data") -> Any:
    """`examples/<folder>/<name>.py` as a module of its own (every example's script is called make_data)."""
    import importlib.util

    path = EXAMPLES / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{folder}_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

