"""Fixtures for the model server tests: real ONNX files and real `kiln serve` processes on 127.0.0.1.

Shared servers are module- or session-scoped to keep the whole suite well under two minutes; the
helpers they are built from (Server, start_server, ...) live in tests/support/server.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import models
from support.fetchrules import LOOPBACK_FETCH
from support.server import Server, start_server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    models.mlp(d / "mlp.onnx")
    models.mlp(d / "small.onnx", features=8, hidden=16, classes=4, seed=3)
    models.two_io(d / "two_io.onnx")
    models.int64_model(d / "int64.onnx")
    models.strings_model(d / "strings.onnx")
    models.fixed_shape(d / "fixed.onnx")
    return d


@pytest.fixture(scope="session")
def server_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def mlp_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    """The reference MLP, no batching, small limits to exercise 413s; started through `kiln serve`."""
    s = start_server(
        model_dir / "mlp.onnx", "mlp", server_tmp,
        "--max-body-bytes", "200000", "--max-elements", "20000", use_cli=True,
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def small_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    """A small MLP (8 -> 4) configured through KILN_* environment variables, version 7."""
    s = start_server(
        model_dir / "small.onnx", "small", server_tmp,
        env={"KILN_MODEL_VERSION": "7", "KILN_MAX_BATCH_SIZE": "1"},
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def two_io_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    s = start_server(model_dir / "two_io.onnx", "two", server_tmp)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def int64_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    s = start_server(model_dir / "int64.onnx", "ints", server_tmp)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def strings_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    s = start_server(model_dir / "strings.onnx", "strings", server_tmp)
    yield s
    s.stop()



@pytest.fixture
def loopback_fetch(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Opt this test in to fetching from 127.0.0.1 over plain http (fetch() and the CLI read KILN_FETCH_*)."""
    for key, value in LOOPBACK_FETCH.items():
        monkeypatch.setenv(key, value)
    return LOOPBACK_FETCH
