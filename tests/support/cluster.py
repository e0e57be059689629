"""Helpers for the tests on the real control plane: throwaway namespaces and the real operator as a child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kubelet import eventually
from testenv import ROOT, free_port

KILN = [sys.executable, "-m", "kiln.cli"]
OPEN_POLICY: dict[str, Any] = {
    "serviceAccounts": {"allow": ["*"]}, "secrets": {"allow": ["*"]}, "pvcs": {"allow": ["*"]},
    "images": {"allowedPrefixes": [""]}, "priorityClasses": {"allow": ["*"]}, "scheduling": {"allowControlPlane": True},
    "serviceTypes": ["ClusterIP", "NodePort", "LoadBalancer"],
    "modelFetch": {"allowHttp": True, "allowPrivateAddresses": True, "requireSha256": False},
}
"""What the operator tests that are not about the policy run with: every rule open (tests/security runs the defaults)."""


def make_namespace(api: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods are only admitted once the namespace's default ServiceAccount has its token.
    eventually(lambda: (api.get("v1", "ServiceAccount", name, "default") or {}).get("secrets"), 30,
               what=f"default service account token in {name}")
    return name


class OperatorProcess:
    """The real operator (`kiln operator`) as a child process, killable and restartable."""

    def __init__(self, kubeconfig: Path, namespaces: list[str], log: Path, extra: list[str] | None = None,
                 policy: dict[str, Any] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.policy = OPEN_POLICY if policy is None else policy
        self.namespaces = namespaces
        self.log = log
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0

    def start(self) -> OperatorProcess:
        self.port, self.metrics_port = free_port(), free_port()
        argv = [*KILN, "operator", "--kubeconfig", str(self.kubeconfig), "--reconcile-interval", "0.5", "--liveness", f"http://127.0.0.1:{self.port}/healthz",
                "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1"]
        for ns in self.namespaces:
            argv += ["--namespace", ns]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILN_TRAINER_IMAGE": "kiln-trainer:test",
               "KILN_SERVER_IMAGE": "kiln-server:test", "KILN_POLICY": json.dumps(self.policy)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv + self.extra, stdout=log, stderr=log, env=env, cwd=ROOT)
        eventually(self._alive, 60, what="operator liveness endpoint")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A scrape of its /metrics: (sample name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
