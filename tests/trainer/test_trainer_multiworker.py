"""Two worker processes on 127.0.0.1 train one model with MultiWorkerMirroredStrategy.

They get the operator's env contract (KILN_WORKER_HOSTS + JOB_COMPLETION_INDEX, no TF_CONFIG);
only worker 0 writes the outputs.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import blobs, manifest, popen_train, subprocess_env, write_csv, write_manifest
from kiln_trainer.distributed import Cluster, setup, tf_config_from_env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.unit
def test_tf_config_from_the_operator_env() -> None:
    env = {"KILN_WORKER_HOSTS": "tj-0.svc:2222,tj-1.svc:2222", "JOB_COMPLETION_INDEX": "1"}
    assert tf_config_from_env(env) == {"cluster": {"worker": ["tj-0.svc:2222", "tj-1.svc:2222"]},
                                       "task": {"type": "worker", "index": 1}}
    assert tf_config_from_env({"KILN_WORKER_HOSTS": "only-one:2222"}) is None
    assert Cluster(2, 0).chief and not Cluster(2, 1).chief and Cluster(3, 0, "chief").chief
    assert setup({}) == Cluster(1, 0)
    explicit = '{"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 1}}'
    assert setup({"TF_CONFIG": explicit}) == Cluster(3, 1, "worker")


@pytest.mark.training
@pytest.mark.slow
def test_two_workers_train_one_model(tmp_path: Path) -> None:
    x, y = blobs(n=240)
    write_csv(tmp_path / "data.csv", x, y)
    path = write_manifest(tmp_path, manifest(workers=2, training={"epochs": 2, "seed": 9, "batchSize": 32}))
    out = tmp_path / "out"
    hosts = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    procs = [popen_train([str(path), "--output", str(out)],
                         subprocess_env(KILN_WORKER_HOSTS=hosts, JOB_COMPLETION_INDEX=str(i),
                                        KILN_TERMINATION_LOG=str(tmp_path / f"term-{i}")), tmp_path)
             for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n-----\n".join(logs)
    assert "epoch 2/2" in logs[0] and "[worker 1] epoch 2/2" in logs[1]
    result = json.loads((out / "result.json").read_text())
    assert result["parityMaxAbsDiff"] <= 1e-5 and result["epochsRun"] == 2
    assert json.loads((tmp_path / "term-0").read_text())["onnxSha256"] == result["onnxSha256"]
    assert not (tmp_path / "term-1").exists()  # only the chief reports the result
