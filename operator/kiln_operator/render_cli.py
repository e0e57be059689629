"""`kiln render FILE...`: print what the operator would create, as multi-document YAML, no cluster.

Uses the same validation (the CRD schemas) and the same builders as the operator: the GitOps preview.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from kiln.manifests import load_file
from kiln.schema import ManifestError
from kiln_operator.modeldeployment.render import build_modeldeployment_preview
from kiln_operator.settings import OperatorSettings
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob.render import build_trainingjob


def render_documents(paths: list[str], settings: OperatorSettings, namespace: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    manifests = [m for path in paths for m in load_file(path)]
    trainingjobs = {m.name: m.doc for m in manifests if m.kind == "TrainingJob"}
    for m in manifests:
        doc = dict(m.doc)
        doc["metadata"] = {**doc["metadata"], "namespace": namespace or doc["metadata"].get("namespace") or "default"}
        try:
            if m.kind == "TrainingJob":
                out += build_trainingjob(doc, settings)
            else:
                out += build_modeldeployment_preview(doc, settings, trainingjobs)
        except RenderError as exc:
            raise ManifestError(f"{m.source}: {m.kind}/{m.name}: {exc}") from exc
    return out


def main(argv: list[str] | None = None) -> int:
    settings = OperatorSettings.from_env()
    p = argparse.ArgumentParser(prog="kiln render", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="YAML files with TrainingJob and ModelDeployment documents")
    p.add_argument("-n", "--namespace", help="namespace for documents that name none (default: default)")
    p.add_argument("--trainer-image", default=settings.trainer_image)
    p.add_argument("--server-image", default=settings.server_image)
    p.add_argument("--server-gpu-image", default=settings.server_gpu_image)
    args = p.parse_args(argv)
    settings.trainer_image = args.trainer_image
    settings.server_image = args.server_image
    settings.server_gpu_image = args.server_gpu_image
    try:
        docs = render_documents(args.files, settings, args.namespace)
    except ManifestError as exc:
        print(f"kiln render: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0
