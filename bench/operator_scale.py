"""Operator scale: 1, 100 and 500 TrainingJobs created at once, Kiln's operator vs a minimal Kopf floor.

Both operators run in the same run against the same real control plane (tests/testenv.py), each on a
namespace of its own, alternating which goes first. Measured per TrainingJob: time from the create
call returning to the Job appearing in a watch; per round: time until every TrainingJob has its Job,
and the operator's peak RSS (VmHWM).

Run: .venv/bin/python bench/operator_scale.py [--sizes 1,100,500] [--out docs/...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kiln_operator import kube  # noqa: E402
from testenv import ControlPlane  # noqa: E402

TJ = {
    "apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
    "spec": {"dataset": {"uri": "pvc://data/d.csv"}, "output": {"uri": "pvc://models/m"},
             "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3}]}},
}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def watch_jobs(ns: str, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each Job first appears (a watch, so no polling interval blurs the times)."""
    import kubernetes

    w = kubernetes.watch.Watch()
    batch = kubernetes.client.BatchV1Api(kube.client())
    while not stop.is_set():
        for ev in w.stream(batch.list_namespaced_job, ns, timeout_seconds=5):
            name = ev["object"].metadata.name
            seen.setdefault(name[: -len("-train")], time.monotonic())
            if stop.is_set():
                w.stop()
                break


def one_round(cp: ControlPlane, which: str, n: int, logdir: Path) -> dict[str, Any]:
    ns = f"bench-{which}-{uuid.uuid4().hex[:5]}"
    kube.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig), "PYTHONUNBUFFERED": "1"}
    if which == "kiln":
        argv = [sys.executable, "-m", "kiln.cli", "operator", "--namespace", ns, "--liveness", ""]
    else:
        argv = [sys.executable, str(ROOT / "bench" / "floor_operator.py"), ns]
    with open(logdir / f"{which}-{n}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    time.sleep(4)  # let the operator list and watch an empty namespace (not part of the measurement)
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_jobs, args=(ns, seen, stop), daemon=True)
    watcher.start()
    time.sleep(0.5)
    created: dict[str, float] = {}

    def make(i: int) -> None:
        name = f"tj-{i:04d}"
        kube.call("POST", kube.path("kiln.dev/v1alpha1", "TrainingJob", ns), {**TJ, "metadata": {"name": name}})
        created[name] = time.monotonic()

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(make, range(n)))
    deadline = time.monotonic() + 600
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    total = max(seen.values()) - t0 if len(seen) == n else float("nan")
    lat = sorted(seen[k] - created[k] for k in created if k in seen)
    rss = peak_rss_mb(proc.pid)
    stop.set()
    proc.terminate()
    proc.wait(timeout=30)
    kube.call("DELETE", f"/api/v1/namespaces/{ns}")
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [lat[0]] * 19
    return {"operator": which, "n": n, "jobs": len(seen), "p50_s": statistics.median(lat), "p95_s": q[18],
            "all_jobs_s": total, "peak_rss_mb": rss}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,100,500")
    p.add_argument("--json", help="write results as JSON here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    cp = ControlPlane(work / "cp").start()
    try:
        kube.configure(str(cp.kubeconfig), pool_size=32)
        kubectl = str(Path.home() / ".cache/kiln/tools/kubectl")
        subprocess.run([kubectl, "--kubeconfig", str(cp.kubeconfig), "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
        time.sleep(2)
        rows = []
        for i, n in enumerate(int(x) for x in args.sizes.split(",")):
            order = ["kiln", "floor"] if i % 2 == 0 else ["floor", "kiln"]
            for which in order:
                row = one_round(cp, which, n, work)
                rows.append(row)
                print(json.dumps(row), flush=True)
        print("\n| TrainingJobs | operator | p50 create->Job (s) | p95 (s) | all Jobs (s) | peak RSS (MB) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']} | {r['operator']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['all_jobs_s']:.2f} | {r['peak_rss_mb']:.0f} |")
        print("\n| TrainingJobs | kiln / floor, p50 | p95 | all Jobs |")
        print("|---|---|---|---|")
        for n in sorted({r["n"] for r in rows}):
            k = next(r for r in rows if r["n"] == n and r["operator"] == "kiln")
            f = next(r for r in rows if r["n"] == n and r["operator"] == "floor")
            print(f"| {n} | {k['p50_s'] / f['p50_s']:.2f}x | {k['p95_s'] / f['p95_s']:.2f}x | {k['all_jobs_s'] / f['all_jobs_s']:.2f}x |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
