"""`KILN_TEST_COMPILED=1`: run the tests on the compiled request path the server image ships.

`make test` runs the server suite twice: as Python (the source) and with this switch, which compiles
`kiln_server` with images/server/build_compiled.py into a temporary folder and puts that folder first
on `sys.path` (in-process tests) and `PYTHONPATH` (every `kiln serve` / `python -m kiln_server` the
tests start). It must run before anything imports `kiln_server`: tests/conftest.py calls it first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
ENABLED = os.environ.get("KILN_TEST_COMPILED") == "1"


def build_script() -> ModuleType:
    """images/server/build_compiled.py as a module (it is a build script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("build_compiled", ROOT / "images" / "server" / "build_compiled.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def activate() -> Path | None:
    """With KILN_TEST_COMPILED=1: build the compiled package and put it first on both paths; its folder."""
    if not ENABLED:
        return None
    if any(name == "kiln_server" or name.startswith("kiln_server.") for name in sys.modules):
        raise RuntimeError("KILN_TEST_COMPILED: kiln_server was imported before the compiled build was put on sys.path")
    out = Path(tempfile.mkdtemp(prefix="kiln-compiled-"))
    build_script().build(out)
    sys.path.insert(0, str(out))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(out) if not old else f"{out}{os.pathsep}{old}"
    return out


def expected_modules() -> list[str]:
    """The modules a server runs compiled under the current switch: all of MODULES, or none."""
    return sorted(build_script().MODULES) if ENABLED else []
