"""ModelDeployment controller (placeholder registration until the server controller lands)."""

from __future__ import annotations

import kopf

from kiln_operator.settings import OperatorSettings


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Attach the ModelDeployment handlers to `registry`."""
    return None
