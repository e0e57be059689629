"""Golden files of `kiln render` for every example: what each renders to (or why a cluster refuses it).

A change to rendering then shows up as a diff of tests/golden/render/ in review;
tests/operator/test_render_unit.py::test_render_golden_files_are_up_to_date fails when they are stale.

    python scripts/gen_golden.py           # rewrite the golden files
    python scripts/gen_golden.py --check   # exit 1 and name the stale ones
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "render"
# Fixed images: the golden files must not depend on the environment of whoever regenerates them.
TRAINER, SERVER = "ghcr.io/kiln-dev/kiln-trainer:0.1.0", "ghcr.io/kiln-dev/kiln-server:0.1.0"


def examples() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").rglob("*.yaml"))


def render(example: Path) -> str:
    """The multi-document YAML `kiln render` prints for `example`, or a comment with its refusal."""
    from kiln_operator.render_cli import render_documents
    from kiln_operator.settings import OperatorSettings

    from kiln.schema import ManifestError

    settings = OperatorSettings()
    settings.trainer_image, settings.server_image = TRAINER, SERVER
    rel = example.relative_to(ROOT)
    try:
        docs = render_documents([str(rel)], settings)
    except ManifestError as exc:
        return f"# kiln render {rel}: refused (a local-mode example)\n# {exc}\n"
    return f"# kiln render {rel}\n" + yaml.safe_dump_all(docs, sort_keys=False)


def golden_path(example: Path) -> Path:
    return GOLDEN / ("__".join(example.relative_to(ROOT / "examples").parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    import os

    os.chdir(ROOT)  # examples name their data relative to the repository
    stale = []
    wanted = {golden_path(e): render(e) for e in examples()}
    for path, text in wanted.items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    extra = [str(p.relative_to(ROOT)) for p in GOLDEN.glob("*.yaml") if p not in wanted] if GOLDEN.exists() else []
    if args.check and (stale or extra):
        print("stale golden files (run python scripts/gen_golden.py): " + ", ".join(stale + extra))
        return 1
    for p in extra if not args.check else []:
        Path(ROOT / p).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
