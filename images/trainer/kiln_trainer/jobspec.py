"""Reading the TrainingJob to run: a manifest file given on the command line, or the one the operator mounts.

Validation and defaulting come from `kiln.manifests`/`kiln.schema` (the CRD schema itself), so the
trainer accepts exactly what the API server accepts; schema errors become a SpecError naming the field.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.manifests import load_file
from kiln.schema import ManifestError, validate
from kiln.spec import TrainingJobSpec
from kiln_trainer.errors import SpecError
from kiln_trainer.settings import TrainerSettings

DEFAULT_SPEC_PATH = "/etc/kiln/trainingjob.yaml"
_FIELD_LINE = re.compile(r"^\s+(\S+?): (.*)$")


@dataclass
class Job:
    """A validated, defaulted TrainingJob document and the folder its relative paths resolve against."""

    doc: dict[str, Any]
    base_dir: Path
    source: Path | None = None

    @property
    def spec(self) -> dict[str, Any]:
        """The spec as written (defaulted): what the checkpoint hash and the BYO contract see."""
        spec: dict[str, Any] = self.doc["spec"]
        return spec

    @functools.cached_property
    def typed(self) -> TrainingJobSpec:
        """The spec as the trainer reads it (kiln.spec: every default the CRD's)."""
        return TrainingJobSpec.from_dict(self.spec)

    @property
    def name(self) -> str:
        return str(self.doc.get("metadata", {}).get("name", "trainingjob"))

    @property
    def namespace(self) -> str | None:
        ns = self.doc.get("metadata", {}).get("namespace")
        return str(ns) if ns else None


def spec_error(exc: ManifestError) -> SpecError:
    """The first schema violation as a one-line SpecError with its field path."""
    for line in str(exc).splitlines()[1:]:
        m = _FIELD_LINE.match(line)
        if m:
            path = m.group(1)
            return SpecError(m.group(2), path if path.startswith(("spec", "metadata", "kind", "api")) else None)
    return SpecError(str(exc).splitlines()[0] if str(exc) else "invalid manifest", None)


def load_job(path: str | Path | None, name: str | None = None) -> Job:
    """The TrainingJob in `path` (first one, or the one called `name`); None means the mounted spec."""
    source = Path(path) if path else Path(TrainerSettings.from_env().spec or DEFAULT_SPEC_PATH)
    try:
        manifests = load_file(source, kinds=("TrainingJob",))
    except ManifestError as exc:
        if not source.exists():
            raise SpecError(f"TrainingJob file {source} not found", None) from exc
        raise spec_error(exc) from exc
    if name:
        manifests = [m for m in manifests if m.name == name]
        if not manifests:
            raise SpecError(f"no TrainingJob named {name!r} in {source}", "metadata.name")
    m = manifests[0]
    return Job(m.doc, m.base_dir, source)


def job_from_doc(doc: dict[str, Any], base_dir: Path) -> Job:
    """A Job from an in-memory document (the Python API used by `kiln run`)."""
    try:
        return Job(validate(doc, "TrainingJob"), base_dir)
    except ManifestError as exc:
        raise spec_error(exc) from exc
