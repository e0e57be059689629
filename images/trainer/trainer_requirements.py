"""Print kiln's requirements for the `trainer` extra (plus extras given as EXTRAS, comma-separated),
by default without tensorflow/tensorflow-cpu: a TensorFlow base image already has its own (GPU) build,
which the extra's `tensorflow-cpu` pin must not replace.

    trainer_requirements.py [--pyproject PATH] [--tensorflow] [EXTRAS]

--pyproject PATH  read pyproject.toml instead of the installed `kiln` wheel's metadata. The trainer
                  Dockerfile installs the requirements from pyproject.toml *before* the wheel, so that
                  layer (TensorFlow and friends, the slow part) is rebuilt only when pyproject.toml
                  changes, not on every code change.
--tensorflow      keep the trainer extra's own TensorFlow requirement: for a base image without
                  TensorFlow (a plain Python base), where nothing else would bring it.

Used by images/trainer/Dockerfile; both sources are the project's own metadata, so the list never
drifts from pyproject.
"""

from __future__ import annotations

import argparse
import re
from importlib.metadata import requires
from pathlib import Path

_TENSORFLOW = re.compile(r"\s*tensorflow(-cpu)?\b", re.I)
# `kiln[operator,trainer]` inside an extra (e.g. `dev`) refers to the project itself: expand it here,
# pip would otherwise look for a `kiln` distribution on the index.
_SELF = re.compile(r"\s*kiln\s*\[([^\]]*)\]\s*$", re.I)


def _wanted(extras: str) -> list[str]:
    out = ["trainer"]
    for e in (x.strip() for x in extras.split(",")):
        if e and e not in out:
            out.append(e)
    return out


def _from_metadata(wanted: list[str], tensorflow: bool) -> list[str]:
    out = []
    for req in requires("kiln") or []:
        name, _, marker = req.partition(";")
        extra = re.search(r'extra\s*==\s*"([^"]+)"', marker)
        if extra and extra.group(1) not in wanted:
            continue
        if _TENSORFLOW.match(name) and not tensorflow:
            continue
        rest = re.sub(r'\s*(and\s+)?extra\s*==\s*"[^"]+"', "", marker).strip()
        out.append(name.strip() + (f"; {rest}" if rest else ""))
    return out


def _from_pyproject(path: Path, wanted: list[str], tensorflow: bool) -> list[str]:
    import tomllib

    project = tomllib.loads(path.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = list(wanted), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"trainer_requirements: {path} has no extra {extra!r} (known: {', '.join(sorted(optional))})")
        for req in optional[extra]:
            self_ref = _SELF.match(req.split(";")[0])
            if self_ref:
                todo.extend(x.strip() for x in self_ref.group(1).split(",") if x.strip())
            elif not _TENSORFLOW.match(req) or tensorflow:
                out.append(req.strip())
    return list(dict.fromkeys(out))


def trainer_requirements(extras: str = "", *, pyproject: str | Path | None = None, tensorflow: bool = False) -> list[str]:
    """Requirement lines for the core plus the `trainer` extra (and `extras`); TensorFlow left out
    unless `tensorflow` is true."""
    wanted = _wanted(extras)
    if pyproject is not None:
        return _from_pyproject(Path(pyproject), wanted, tensorflow)
    return _from_metadata(wanted, tensorflow)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", nargs="?", default="", help="extra optional groups besides `trainer`, comma-separated")
    parser.add_argument("--pyproject", help="read this pyproject.toml instead of the installed wheel's metadata")
    parser.add_argument("--tensorflow", action="store_true", help="keep the trainer extra's own TensorFlow requirement")
    args = parser.parse_args(argv)
    print("\n".join(trainer_requirements(args.extras, pyproject=args.pyproject, tensorflow=args.tensorflow)))


if __name__ == "__main__":
    main()
