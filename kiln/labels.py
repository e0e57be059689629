"""Label selectors (metav1.LabelSelector semantics), shared by the operator and `kiln run`.

A ModelDeployment's `spec.model.trainingJobSelector` picks TrainingJobs by label in the cluster and in
a local file alike, so both read it with this one function.
"""

from __future__ import annotations

from typing import Any


def _matches_expression(labels: dict[str, str], expr: dict[str, Any]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", ""), list(expr.get("values") or [])
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    return False


def selector_matches(selector: dict[str, Any], labels: dict[str, str] | None) -> bool:
    """matchLabels AND matchExpressions; an empty selector matches everything."""
    labels = labels or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_matches_expression(labels, e) for e in selector.get("matchExpressions") or [])
