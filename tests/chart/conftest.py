"""Helm chart fixtures: the real helm binary (offline, private HOME folders) and rendering helpers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.chart import CHART, set_args

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def helm(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Run the project's helm with its cache/config/data in a private folder."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(tools / "helm"), *args], text=True, capture_output=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[..., list[dict[str, Any]]]:
    """`helm template` the chart into its documents (CRDs included unless told otherwise)."""

    def run(values: dict[str, Any] | None = None, release: str = "kiln", namespace: str = "kiln-system",
            include_crds: bool = True) -> list[dict[str, Any]]:
        args = ["template", release, str(CHART), "--namespace", namespace, *set_args(values)]
        if include_crds:
            args.append("--include-crds")
        out = helm(*args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return run
