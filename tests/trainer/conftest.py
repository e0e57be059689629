"""Fixtures for the trainer tests: running `kiln train` in this process, a fresh Keras session per test.

TensorFlow is kept to 2 intra-op threads (the machine is shared); the env vars must be set before TF loads.
Datasets, manifests and child-process helpers live in tests/support/trainer.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.trainer import Run

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


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
