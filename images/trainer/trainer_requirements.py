"""Print the installed `kiln` wheel's requirements for the `trainer` extra (plus extras given as
argv[1], comma-separated), without tensorflow/tensorflow-cpu: the image's base already has the GPU build.

Used by images/trainer/Dockerfile; reads the wheel's own metadata so the list never drifts from pyproject.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires


def trainer_requirements(extras: str = "") -> list[str]:
    """Requirement lines for the core plus the `trainer` extra (and `extras`), TensorFlow left out."""
    wanted = {"trainer", *filter(None, (e.strip() for e in extras.split(",")))}
    out = []
    for req in requires("kiln") or []:
        name, _, marker = req.partition(";")
        extra = re.search(r'extra\s*==\s*"([^"]+)"', marker)
        if extra and extra.group(1) not in wanted:
            continue
        if re.match(r"\s*tensorflow(-cpu)?\b", name):
            continue
        rest = re.sub(r'\s*(and\s+)?extra\s*==\s*"[^"]+"', "", marker).strip()
        out.append(name.strip() + (f"; {rest}" if rest else ""))
    return out


if __name__ == "__main__":
    print("\n".join(trainer_requirements(sys.argv[1] if len(sys.argv) > 1 else "")))
