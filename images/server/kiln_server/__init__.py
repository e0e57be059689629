"""Kiln's model server: ONNX Runtime behind the KServe V2 (and V1) protocol over HTTP and gRPC."""

from __future__ import annotations

import sys
from importlib.machinery import EXTENSION_SUFFIXES


def compiled_modules() -> list[str]:
    """The loaded `kiln_server` modules that run as compiled extensions (images/server/build_compiled.py).

    The server image ships the request path compiled; a source checkout runs it as Python. The
    `listening` log line carries this list, so a log says which one a pod runs.
    """
    out = []
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None) or ""
        if name.startswith("kiln_server.") and path.endswith(tuple(EXTENSION_SUFFIXES)):
            out.append(name.rsplit(".", 1)[1])
    return sorted(out)
