"""`kiln render FILE...`: print what the operator would create, as multi-document YAML, no cluster.

Uses the same validation (the CRD schemas), the same policy check and the same builders as the operator:
the GitOps preview. A spec the policy refuses prints `PolicyViolation` and the field, and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from kiln.manifests import load_file
from kiln.policy import (
    REASON,
    Policy,
    PolicyError,
    Violation,
    check_modeldeployment,
    check_trainingjob,
    describe,
    load_policy_file,
    lookups,
)
from kiln.schema import ManifestError
from kiln_operator.modeldeployment.render import build_modeldeployment_preview
from kiln_operator.settings import OperatorSettings
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob.trials import preview


def policy_violations(kind: str, doc: dict[str, Any], policy: Policy, trainingjobs: dict[str, dict[str, Any]]) -> list[Violation]:
    """The operator's check, offline. Secrets/PVCs that only a label selector admits cannot be read here:
    they pass, with a note on stderr saying which label the operator will require."""
    spec = doc.get("spec") or {}
    tj = trainingjobs.get(((spec.get("model") or {}).get("trainingJob")) or "")
    output = (((tj or {}).get("spec") or {}).get("output") or {}).get("uri")
    model_uri = output.rstrip("/") + "/model.onnx" if kind == "ModelDeployment" and output else None
    assumed: dict[tuple[str, str], dict[str, str] | None] = {}
    for ref_kind, name in sorted(lookups(kind, spec, policy, model_uri or "")):
        selectors = policy.pvc_selectors if ref_kind == "PersistentVolumeClaim" else policy.secret_selectors
        assumed[(ref_kind, name)] = dict(selectors[0])
        wanted = " or ".join(",".join(f"{k}={v}" for k, v in sel.items()) for sel in selectors)
        print(f"kiln render: note: {kind}/{doc['metadata']['name']}: {ref_kind} {name} is admitted only if labelled "
              f"{wanted} (the operator checks; kiln render cannot)", file=sys.stderr)
    if kind == "TrainingJob":
        return check_trainingjob(spec, policy, assumed)
    return check_modeldeployment(spec, policy, assumed, model_uri=model_uri)


def render_documents(paths: list[str], settings: OperatorSettings, namespace: str | None = None,
                     profile: str | None = None) -> list[dict[str, Any]]:
    """Every child the operator would create, or ManifestError (invalid, refused by the policy, unrenderable)."""
    out: list[dict[str, Any]] = []
    policy = settings.tenant_policy().for_profile(profile)
    manifests = [m for path in paths for m in load_file(path)]
    trainingjobs = {m.name: m.doc for m in manifests if m.kind == "TrainingJob"}
    for m in manifests:
        doc = dict(m.doc)
        doc["metadata"] = {**doc["metadata"], "namespace": namespace or doc["metadata"].get("namespace") or "default"}
        violations = policy_violations(m.kind, doc, policy, trainingjobs)
        if violations:
            raise ManifestError(f"{m.source}: {m.kind}/{m.name}: {REASON}: {describe(violations)}")
        try:
            if m.kind == "TrainingJob":
                out += preview(doc, settings)
            else:
                out += build_modeldeployment_preview(doc, settings, trainingjobs)
        except RenderError as exc:
            raise ManifestError(f"{m.source}: {m.kind}/{m.name}: {exc}") from exc
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        settings = OperatorSettings.from_env()
    except PolicyError as exc:
        print(f"kiln render: {exc}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="kiln render", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="YAML files with TrainingJob and ModelDeployment documents")
    p.add_argument("-n", "--namespace", help="namespace for documents that name none (default: default)")
    p.add_argument("--trainer-image", default=settings.trainer_image)
    p.add_argument("--server-image", default=settings.server_image)
    p.add_argument("--server-gpu-image", default=settings.server_gpu_image)
    p.add_argument("--policy", metavar="FILE", help="YAML file with the chart's `policy:` values (default: KILN_POLICY_FILE, "
                   "KILN_POLICY, else the chart's safe defaults)")
    p.add_argument("--profile", help="preview as in a namespace labelled kiln.dev/policy-profile=PROFILE")
    args = p.parse_args(argv)
    if args.policy:
        try:
            settings.policy = load_policy_file(args.policy)
        except PolicyError as exc:
            print(f"kiln render: {exc}", file=sys.stderr)
            return 2
    settings.trainer_image = args.trainer_image
    settings.server_image = args.server_image
    settings.server_gpu_image = args.server_gpu_image
    try:
        docs = render_documents(args.files, settings, args.namespace, args.profile)
    except ManifestError as exc:
        print(f"kiln render: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0
