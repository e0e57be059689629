"""Process setup before TensorFlow is imported: writable scratch folders and quiet, line-based logs.

Why: the training container's root filesystem is read-only. Libraries that write caches (matplotlib,
Keras, anything using $HOME) get folders under $TMPDIR instead, and TensorFlow's C++ logging is
turned down so the pod log shows our one line per epoch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _writable(path: str | None) -> bool:
    return bool(path) and os.path.isdir(str(path)) and os.access(str(path), os.W_OK)


def prepare_environment() -> None:
    """Point HOME, MPLCONFIGDIR and KERAS_HOME at writable folders when they are not; quiet TF logs."""
    if not _writable(os.environ.get("TMPDIR") or tempfile.gettempdir()):
        os.environ["TMPDIR"] = "/tmp"
        tempfile.tempdir = None
    scratch = Path(tempfile.gettempdir()) / f"kiln-{os.getuid()}"
    if not _writable(os.environ.get("HOME")):
        os.environ["HOME"] = str(scratch / "home")
    os.environ.setdefault("MPLCONFIGDIR", str(scratch / "matplotlib"))
    os.environ.setdefault("KERAS_HOME", str(scratch / "keras"))
    for var in ("HOME", "MPLCONFIGDIR", "KERAS_HOME"):
        with contextlib.suppress(OSError):
            Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
