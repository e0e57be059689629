"""Reading Kiln manifests from files: every document validated and defaulted, errors naming the document."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiln import GROUP
from kiln.schema import KINDS, ManifestError, validate


@dataclass
class Manifest:
    """One validated, defaulted Kiln document and where it came from."""

    doc: dict[str, Any]
    source: Path
    index: int
    raw: dict[str, Any] = field(default_factory=dict)
    """The document as written, before the CRD defaults: which fields the user set."""

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def base_dir(self) -> Path:
        """Relative dataset/output paths resolve against the manifest's folder."""
        return self.source.resolve().parent


def load_file(path: str | Path, *, kinds: tuple[str, ...] = tuple(KINDS), foreign: list[str] | None = None) -> list[Manifest]:
    """All Kiln documents in a YAML file (`-`: standard input), validated; other kinds are an error unless skipped by `kinds`.

    With a `foreign` list, documents of other API groups (a PersistentVolumeClaim, a Namespace, ...) are
    skipped instead and named there as `Kind/name`; an unknown kind in Kiln's group stays an error.
    """
    if str(path) == "-":  # `kustomize build | kiln render -`
        path, text = Path("<stdin>"), sys.stdin.read()
    else:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    out = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{path} document {i + 1}"
        if isinstance(doc, dict) and doc.get("kind") in KINDS and doc["kind"] not in kinds:
            continue
        if foreign is not None and isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) \
                and doc["apiVersion"].split("/")[0] != GROUP:
            meta = doc.get("metadata")
            foreign.append(f"{doc.get('kind')}/{meta.get('name') if isinstance(meta, dict) else None}")
            continue
        out.append(Manifest(validate(doc, where), path, i, raw=doc))
    if not out:
        raise ManifestError(f"{path}: no {' or '.join(kinds)} documents found")
    return out
