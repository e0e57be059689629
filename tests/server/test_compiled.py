"""The compiled request path (images/server/build_compiled.py) is what runs when it should, and only then.

`make test` runs tests/server twice: as source, and with KILN_TEST_COMPILED=1 on the Cython build the
server image ships (tests/support/compiled.py). These tests pin which of the two each run really
exercised, in-process and in a started server (its `listening` log line), so a compiled run that
silently fell back to the sources, or a source run that picked up stale extensions, fails.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from support import compiled
from support.server import start_server

pytestmark = pytest.mark.server


def test_in_process_imports_are_the_expected_kind() -> None:
    import kiln_server

    for mod in compiled.build_script().MODULES:
        importlib.import_module(f"kiln_server.{mod}")
    assert kiln_server.compiled_modules() == compiled.expected_modules()


def test_a_started_server_says_which_modules_run_compiled(model_dir: Path, server_tmp: Path) -> None:
    server = start_server(model_dir / "small.onnx", "small", server_tmp)
    try:
        listening = [doc for doc in server.log_lines() if doc.get("event") == "listening"]
        assert listening, "no listening line in the server log"
        assert listening[0]["compiled"] == compiled.expected_modules()
        x = [[0.5] * 8]
        r = server.infer({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": x}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [1, 4]
    finally:
        server.stop()
