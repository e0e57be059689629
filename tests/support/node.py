"""Helpers of the e2e tier (tests/e2e): kubectl and helm against the real node, hostPath volumes, polling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubelet

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
TOOLS = CACHE / "tools"
IMAGES = {"operator": "localhost/kiln/operator:dev", "trainer": "localhost/kiln/trainer:dev",
          "server": "localhost/kiln/server:dev"}
RELEASE, RELEASE_NS = "kiln", "kiln-system"
UID = 65532
"""The images' user: hostPath volumes must be writable by it (fsGroup does not apply to hostPath)."""


def eventually(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """kubelet.eventually with the e2e tier's argument order; a failed or half-written kubectl answer is "not yet"."""
    return kubelet.eventually(fn, timeout, interval, what, retry=(AssertionError, subprocess.CalledProcessError, json.JSONDecodeError))


@dataclass
class Kube:
    """kubectl and helm against the node cluster."""

    kubeconfig: Path

    def run(self, *args: str, input: str | None = None, check: bool = True, namespace: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [str(TOOLS / "kubectl"), "--kubeconfig", str(self.kubeconfig)]
        if namespace:
            argv += ["-n", namespace]
        proc = subprocess.run(argv + list(args), input=input, text=True, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        proc = self.run("get", kind, name, "-o", "json", namespace=namespace, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)

    def items(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        if namespace is None:
            args.append("--all-namespaces")
        return json.loads(self.run(*args, namespace=namespace).stdout)["items"]

    def apply(self, doc: dict[str, Any] | str, namespace: str | None = None) -> None:
        self.run("apply", "-f", "-", input=doc if isinstance(doc, str) else json.dumps(doc), namespace=namespace)

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            env[var] = str(CACHE / "helm" / sub)
        proc = subprocess.run([str(TOOLS / "helm"), *args], text=True, capture_output=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def status(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        return (self.get(kind, name, namespace) or {}).get("status") or {}

    def create_namespace(self, name: str) -> str:
        """A new namespace, once its default ServiceAccount has the token pods need to be admitted."""
        self.run("create", "namespace", name)
        eventually(lambda: (self.get("serviceaccount", "default", name) or {}).get("secrets"), 60,
                   f"the default ServiceAccount token in {name}")
        return name


def run_script(*argv: str, timeout: float) -> str:
    proc = subprocess.run(["bash", *argv], text=True, capture_output=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


class Volumes:
    """hostPath PersistentVolumes bound to claims, the node's only storage (one node: the path is local)."""

    def __init__(self, kube: Kube, base: Path) -> None:
        self.kube = kube
        self.base = base
        self.made: list[str] = []

    def claim(self, namespace: str, claim: str, size: str = "1Gi") -> Path:
        """A PVC `claim` in `namespace`, bound to a new hostPath PV; returns the host folder behind it."""
        pv = f"{namespace}-{claim}"
        path = self.base / pv
        path.mkdir(parents=True)
        os.chown(path, UID, UID)
        self.kube.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                         "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
                                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "kiln-local",
                                  "hostPath": {"path": str(path), "type": "Directory"},
                                  "claimRef": {"namespace": namespace, "name": claim}}})
        self.kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "kiln-local", "volumeName": pv,
                                  "resources": {"requests": {"storage": size}}}}, namespace=namespace)
        eventually(lambda: self.kube.status("pvc", claim, namespace).get("phase") == "Bound", 60, f"PVC {claim} bound")
        self.made.append(pv)
        return path

    def seed(self, folder: Path, src: Path, name: str) -> None:
        """Copy a file onto a volume as the images' user would have written it."""
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chown(dst, UID, UID)
