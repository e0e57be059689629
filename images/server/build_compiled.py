#!/usr/bin/env python
"""Compile the server's request path (HTTP, routing, V2/V1 decoding, batching, metrics) with Cython.

    python images/server/build_compiled.py OUT_DIR      (run from anywhere; needs Cython, a C compiler
                                                          and Python's headers)

Writes `OUT_DIR/kiln_server/`: the package's sources plus `<module>.cpython-*.so` for each module in
`MODULES`, so `PYTHONPATH=OUT_DIR` runs the compiled server (the tests and `bench/server/floors.py
--compiled` do). The server image copies only the extensions next to the installed package's `.py`
files: Python's import system tries extension modules before source files in a directory.

Why: the per-request cost is CPython's interpreter overhead spread over some 100 lines (docs/benchmarks.md,
"Per-request cost"); compiled, the same code runs those lines without the bytecode loop. Nothing is
rewritten for Cython: the source stays the one truth, tested as Python, and `annotation_typing` is off
so an annotation never turns into a C type that would change what a function accepts.
`kiln_server.compiled_modules()` says, at startup and in the `listening` log line, which modules run compiled.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "kiln_server"
# The modules every inference request passes through. Start-up, settings, fetch, workers and gRPC
# codecs stay Python: they run once, or are not on the REST hot path.
MODULES = ("http", "app", "messages", "auth", "v1", "v2", "protocol", "serving", "batching", "model", "metrics")


def build(out: Path, jobs: int = 0) -> list[Path]:
    """The package's sources and the compiled `MODULES` in `out/kiln_server/`; returns the extension files."""
    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    out = out.resolve()
    (out / "kiln_server").mkdir(parents=True, exist_ok=True)
    for path in PACKAGE.glob("*.py"):
        shutil.copy(path, out / "kiln_server" / path.name)
    with tempfile.TemporaryDirectory(prefix="kiln-compile-") as tmp:
        src = Path(tmp) / "kiln_server"
        src.mkdir()
        for mod in MODULES:
            shutil.copy(PACKAGE / f"{mod}.py", src / f"{mod}.py")
        (src / "__init__.py").write_text("")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            exts = cythonize(  # type: ignore[no-untyped-call]
                [Extension(f"kiln_server.{m}", [f"kiln_server/{m}.py"], extra_compile_args=["-O2"]) for m in MODULES],
                compiler_directives={"language_level": 3, "annotation_typing": False},
                quiet=True,
                nthreads=jobs or os.cpu_count() or 1,
            )
            dist = Distribution({"name": "kiln-server-compiled", "ext_modules": exts})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib = str(out)
            cmd.build_temp = str(Path(tmp) / "build")
            cmd.parallel = jobs or os.cpu_count() or 1
            cmd.ensure_finalized()
            cmd.run()
        finally:
            os.chdir(cwd)
    built = sorted((out / "kiln_server").glob("*.so"))
    names = {p.name.split(".", 1)[0] for p in built}
    missing = [m for m in MODULES if m not in names]
    if missing:
        raise SystemExit(f"build_compiled: no extension was written for {missing}")
    return built


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for path in build(Path(sys.argv[1])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
