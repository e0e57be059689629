"""Generates docs/api-reference.md from the CRD schemas in crds/ (a test fails when it is stale).

Run: python scripts/gen_api_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api-reference.md"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity (int or string)"
    t = node.get("type", "object")
    if t == "array":
        return f"[]{_type(node.get('items', {}))}"
    if t == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    return str(t)


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "items" in node and "enum" in node["items"]:
        parts.append("items: " + ", ".join(f"`{v}`" for v in node["items"]["enum"]))
    for key, word in (("minimum", ">="), ("maximum", "<="), ("minItems", "min items"), ("maxItems", "max items"),
                      ("minLength", "min length"), ("maxLength", "max length")):
        if key in node:
            op = word
            if key == "minimum" and node.get("exclusiveMinimum"):
                op = ">"
            if key == "maximum" and node.get("exclusiveMaximum"):
                op = "<"
            parts.append(f"{op} {node[key]}")
    if "pattern" in node and not node.get("x-kubernetes-int-or-string"):
        parts.append(f"pattern `{node['pattern']}`")
    if "default" in node:
        parts.append(f"default `{yaml.safe_dump(node['default'], default_flow_style=True).strip()}`")
    for key in ("oneOf", "anyOf"):
        if key in node:
            options = [" + ".join(f"`{r}`" for r in o.get("required", [])) for o in node[key]]
            parts.append(("exactly one of " if key == "oneOf" else "at least one of ") + " / ".join(options))
    return "; ".join(parts)


def _rows(node: dict[str, Any], prefix: str, out: list[str]) -> None:
    required = set(node.get("required", []))
    for name, sub in (node.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        req = " (required)" if name in required else ""
        desc = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
        out.append(f"| `{path}`{req} | {_type(sub)} | {desc} | {_constraints(sub)} |")
        if sub.get("type") == "object":
            _rows(sub, path, out)
        elif sub.get("type") == "array" and (sub.get("items") or {}).get("type") == "object":
            _rows(sub["items"], path + "[]", out)


def render() -> str:
    lines = ["# API reference", "", "Generated from `crds/` by `scripts/gen_api_docs.py`; do not edit by hand.", ""]
    for file in ("trainingjobs.yaml", "modeldeployments.yaml"):
        crd = yaml.safe_load((ROOT / "crds" / file).read_text())
        spec = crd["spec"]
        version = spec["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        kind = spec["names"]["kind"]
        lines += [f"## {kind}", "",
                  f"`apiVersion: {spec['group']}/{version['name']}`, short name `{spec['names']['shortNames'][0]}`, "
                  f"category `{spec['names']['categories'][0]}`, namespaced, status subresource.", ""]
        lines += ["Printer columns: " + ", ".join(f"{c['name']} (`{c['jsonPath']}`)" for c in version["additionalPrinterColumns"]), ""]
        for part in ("spec", "status"):
            node = schema["properties"][part]
            lines += [f"### {kind} `{part}`", "", " ".join(node.get("description", "").split()), ""]
            if _constraints(node):
                lines += [f"Constraint: {_constraints(node)}.", ""]
            lines += ["| Field | Type | Description | Constraints |", "|---|---|---|---|"]
            rows: list[str] = []
            _rows(node, part, rows)
            lines += [*rows, ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_api_docs.py")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
