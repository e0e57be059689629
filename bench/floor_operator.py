"""The floor for the operator scale benchmark: a minimal Kopf operator that only creates one Job per
TrainingJob (no RBAC, no ConfigMap, no status). Kiln's operator is measured against this in one run.

Run: python bench/floor_operator.py NAMESPACE  (KUBECONFIG set)
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
import kubernetes

registry = kopf.OperatorRegistry()
api: kubernetes.client.BatchV1Api | None = None


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global api
    settings.posting.level = logging.WARNING
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="floor.bench")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="floor.bench")
    settings.watching.server_timeout = 300
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=20))
    kubernetes.config.load_kube_config()
    api = kubernetes.client.BatchV1Api()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.create("kiln.dev", "v1alpha1", "trainingjobs", registry=registry)
async def create(name: str, namespace: str, uid: str, **_: Any) -> None:
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{name}-train", "namespace": namespace,
                     "ownerReferences": [{"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "name": name, "uid": uid,
                                          "controller": True}]},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
                                                          "containers": [{"name": "trainer", "image": "trainer:bench"}]}}},
    }
    assert api is not None
    await asyncio.to_thread(api.create_namespaced_job, namespace, job)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    kopf.run(registry=registry, namespaces=[sys.argv[1]], standalone=True)
