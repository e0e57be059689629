"""The e2e tier: Kiln on a real node.

`scripts/images.sh` builds the operator, trainer and server images from the project's own Dockerfiles,
`scripts/cluster.sh up` starts a single-node Kubernetes 1.20 (kubelet, containerd, runc, CNI bridge,
kube-proxy, kube-scheduler, RBAC) that runs them, and the real `helm` installs the chart, so the
operator runs as a pod on its chart RBAC. Nothing here plays the kubelet.

Set KILN_E2E_KUBECONFIG to run against a cluster that is already up (it is then left running), or
KILN_E2E_KEEP=1 to leave the one this session started (`scripts/cluster.sh down` stops it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.node import IMAGES, RELEASE, RELEASE_NS, ROOT, SCRIPTS, Kube, Volumes, run_script


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `last` (the uninstall, which deletes the CRDs) run after every other test, whatever file they are in."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    """The node cluster: the session's own (images built, `cluster.sh up`, `down` at the end) or KILN_E2E_KUBECONFIG's."""
    given = os.environ.get("KILN_E2E_KUBECONFIG")
    if given:
        yield Kube(Path(given))
        return
    if os.geteuid() != 0:
        pytest.fail("the e2e tier runs a real node and needs root (scripts/cluster.sh)")
    run_script(str(SCRIPTS / "tools.sh"), timeout=900)
    run_script(str(SCRIPTS / "images.sh"), timeout=3000)
    kubeconfig = Path(run_script(str(SCRIPTS / "cluster.sh"), "up", timeout=1800).strip().splitlines()[-1])
    try:
        yield Kube(kubeconfig)
    finally:
        if not os.environ.get("KILN_E2E_KEEP"):
            run_script(str(SCRIPTS / "cluster.sh"), "down", timeout=300)


@pytest.fixture(scope="session")
def chart(kube: Kube) -> dict[str, str]:
    """The chart installed by the real helm: the operator runs as a pod from its image, on the chart's RBAC."""
    values = {
        "image.repository": IMAGES["operator"].split(":")[0], "image.tag": "dev",
        "trainer.image.repository": IMAGES["trainer"].split(":")[0], "trainer.image.tag": "dev",
        "server.image.repository": IMAGES["server"].split(":")[0], "server.image.tag": "dev",
        "operator.reconcileInterval": "2",
        # The quickstart's claims, admitted by name (the default policy admits claims labelled kiln.dev/mountable=true).
        "policy.pvcs.allow": "{kiln-data,kiln-models}",
        # The image-pull failure scenario names a missing localhost/kiln/... image: allowed by prefix.
        "policy.images.allowedPrefixes": "{localhost/kiln/}",
    }
    sets = [f"{k}={v}" for k, v in values.items()]
    kube.helm("upgrade", "--install", RELEASE, str(ROOT / "charts" / "kiln"), "-n", RELEASE_NS, "--create-namespace",
              "--wait", "--timeout", "3m", *[a for s in sets for a in ("--set", s)])
    return {"release": RELEASE, "namespace": RELEASE_NS}


@pytest.fixture
def namespace(kube: Kube, chart: dict[str, str]) -> Iterator[str]:
    """A fresh namespace, deleted afterwards (its TrainingJobs and ModelDeployments with it)."""
    name = kube.create_namespace(f"e2e-{uuid.uuid4().hex[:6]}")
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def volumes(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volumes]:
    v = Volumes(kube, tmp_path_factory.mktemp("volumes"))
    yield v
    for pv in v.made:
        kube.run("delete", "pv", pv, "--wait=false", check=False)
