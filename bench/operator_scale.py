"""Operator scale: 1, 100 and 500 TrainingJobs created at once, Kiln's operator vs a minimal Kopf floor.

Both operators run in the same run against the same real control plane (tests/testenv.py), each on a
namespace of its own, alternating which goes first. Measured per TrainingJob: time from the create
call returning to the Job appearing in a watch, and to the Job's first Pod appearing (the Job controller
made it: training can start); per round: time until every TrainingJob has its Job and its Pod, the
operator's peak RSS (VmHWM) and CPU, and pod creations the API server refused (FailedCreate events).

Run: .venv/bin/python bench/operator_scale.py [--sizes 1,100,500] [--repeat 3] [--json bench/results/operator_scale.json]
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
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testenv import ControlPlane  # noqa: E402

from kiln import kube  # noqa: E402

TJ = {
    "apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
    "spec": {"dataset": {"uri": "pvc://data/d.csv"}, "output": {"uri": "pvc://models/m"},
             "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3}]}},
}


METRICS = ("p50_s", "p95_s", "all_jobs_s", "pod_p50_s", "pod_p95_s", "all_pods_s")
"""Compared kiln / floor: create -> Job (the issue's measure) and create -> first Pod (when training can start)."""


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cores(interval: float = 1.0) -> float:
    """Cores in use machine-wide over `interval` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)
    b0, t0 = sample()
    time.sleep(interval)
    b1, t1 = sample()
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def wait_quiet(limit: float = 0.3, timeout: float = 90.0) -> float:
    """Wait until the machine is idle (the previous round's deletions digested); the busy level reached.

    Without this the first operator of each pair ran while etcd and the garbage collector were still
    busy with the previous round's namespace, and was 1.5-2x slower for it.
    """
    deadline = time.monotonic() + timeout
    busy = busy_cores()
    while busy > limit and time.monotonic() < deadline:
        busy = busy_cores()
    return busy


def watch_first(ns: str, kind: str, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each TrainingJob's Job (kind "Job") or the Job's first Pod (kind "Pod") first appears.

    A watch, so no polling interval blurs the times. Jobs are named `<tj>-train`, and the Job
    controller labels its Pods `job-name=<tj>-train`.
    """
    import kubernetes

    w = kubernetes.watch.Watch()
    # The official client's watch helper (kiln.kube has no watch: Kopf does the operator's watching).
    # The test control plane's kubeconfig skips TLS verification: a warning per request adds nothing.
    import urllib3

    warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    api = kubernetes.config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
    list_fn = (kubernetes.client.BatchV1Api(api).list_namespaced_job if kind == "Job"
               else kubernetes.client.CoreV1Api(api).list_namespaced_pod)
    while not stop.is_set():
        for ev in w.stream(list_fn, ns, timeout_seconds=5):
            meta = ev["object"].metadata
            job = meta.name if kind == "Job" else (meta.labels or {}).get("job-name", "")
            if job:
                seen.setdefault(job[: -len("-train")], time.monotonic())
            if stop.is_set():
                w.stop()
                break


def quantiles(lat: list[float]) -> tuple[float, float]:
    """(p50, p95) of latencies; NaN when there are none (a round that did not wait for Pods)."""
    if not lat:
        return float("nan"), float("nan")
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [lat[0]] * 19
    return statistics.median(lat), q[18]


def one_round(cp: ControlPlane, which: str, n: int, logdir: Path, wrap: list[str] | None = None,
              pods: bool = True) -> dict[str, Any]:
    idle = wait_quiet()
    ns = f"bench-{which}-{uuid.uuid4().hex[:5]}"
    kube.blocking().call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig), "PYTHONUNBUFFERED": "1"}
    if which == "kiln":
        argv = [sys.executable, "-m", "kiln.cli", "operator", "--namespace", ns, "--liveness", ""]
        if os.environ.get("BENCH_PROFILE"):  # cProfile output of the operator (it runs one thread)
            argv[1:1] = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]]
    else:
        argv = [sys.executable, str(ROOT / "bench" / "floor_operator.py"), ns]
    argv = [*(wrap or []), *argv]
    with open(logdir / f"{which}-{n}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    time.sleep(4)  # let the operator list and watch an empty namespace (not part of the measurement)
    seen: dict[str, float] = {}
    stop = threading.Event()
    pods_seen: dict[str, float] = {}
    for kind, into in (("Job", seen), ("Pod", pods_seen)):
        threading.Thread(target=watch_first, args=(ns, kind, into, stop), daemon=True).start()
    time.sleep(0.5)
    created: dict[str, float] = {}

    def make(i: int) -> None:
        name = f"tj-{i:04d}"
        kube.blocking().call("POST", kube.path("kiln.dev/v1alpha1", "TrainingJob", ns), {**TJ, "metadata": {"name": name}})
        created[name] = time.monotonic()

    cpu0 = cpu_seconds(proc.pid)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(make, range(n)))
    deadline = time.monotonic() + 600
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    total = max(seen.values()) - t0 if len(seen) == n else float("nan")
    lat = sorted(seen[k] - created[k] for k in created if k in seen)
    while pods and len(pods_seen) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    pod_total = max(pods_seen.values()) - t0 if len(pods_seen) == n else float("nan")
    pod_lat = sorted(pods_seen[k] - created[k] for k in created if k in pods_seen) if pods else []
    rss = peak_rss_mb(proc.pid)
    events = kube.blocking().call("GET", f"/api/v1/namespaces/{ns}/events").get("items") or []
    failed = [e for e in events if e.get("reason") == "FailedCreate"]
    failed_creates = len(failed)
    # Why they were refused, e.g. a ServiceAccount whose token Secret did not exist yet (first 3 distinct).
    failed_messages = list(dict.fromkeys(str(e.get("message", ""))[:300] for e in failed))[:3]
    if os.environ.get("BENCH_EVENTS"):
        from collections import Counter
        print(Counter((e["involvedObject"]["kind"], e["reason"]) for e in events), flush=True)
    cpu = cpu_seconds(proc.pid) - cpu0
    stop.set()
    proc.terminate()
    proc.wait(timeout=30)
    kube.blocking().call("DELETE", f"/api/v1/namespaces/{ns}")
    # The next round starts on a quiet control plane: namespace deletion (and its garbage) is heavy.
    gone = time.monotonic() + 300
    while kube.blocking().get("v1", "Namespace", None, ns) is not None and time.monotonic() < gone:
        time.sleep(0.5)
    p50, p95 = quantiles(lat)
    pod_p50, pod_p95 = quantiles(pod_lat)
    return {"operator": which, "n": n, "jobs": len(seen), "p50_s": p50, "p95_s": p95,
            "all_jobs_s": total, "pod_p50_s": pod_p50, "pod_p95_s": pod_p95, "all_pods_s": pod_total,
            "peak_rss_mb": rss,
            "cpu_s": cpu, "failed_pod_creates": failed_creates, "failed_pod_create_messages": failed_messages,
            "busy_cores_before": round(idle, 2)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,100,500")
    p.add_argument("--json", help="write results as JSON here (the committed ones are in bench/results/)")
    p.add_argument("--repeat", type=int, default=1, help="rounds per size (the order of the two alternates)")
    p.add_argument("--only", choices=["kiln", "floor"], help="run one operator (profiling; no ratios)")
    p.add_argument("--no-pods", action="store_true", help="end each round once every Job exists (quicker; no Pod times)")
    p.add_argument("--wrap", default="", help="prefix for the operator command, e.g. 'py-spy record -o prof.svg --'")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    cp = ControlPlane(work / "cp").start()
    try:
        kube.configure(str(cp.kubeconfig), pool_size=32)
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        kubectl = str(Path.home() / ".cache/kiln/tools/kubectl")
        subprocess.run([kubectl, "--kubeconfig", str(cp.kubeconfig), "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
        time.sleep(2)
        rows = []
        plan = [int(x) for x in args.sizes.split(",") for _ in range(args.repeat)]
        for i, n in enumerate(plan):
            order = ["kiln", "floor"] if i % 2 == 0 else ["floor", "kiln"]
            for which in [args.only] if args.only else order:
                row = one_round(cp, which, n, work, args.wrap.split() if args.wrap else None, pods=not args.no_pods)
                rows.append(row)
                print(json.dumps(row), flush=True)
        print("\n| TrainingJobs | operator | p50 create->Job (s) | p95 (s) | all Jobs (s) | p50 create->Pod (s) | p95 (s) "
              "| all Pods (s) | peak RSS (MB) | operator CPU (s) | failed pod creates |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']} | {r['operator']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['all_jobs_s']:.2f} "
                  f"| {r['pod_p50_s']:.3f} | {r['pod_p95_s']:.3f} | {r['all_pods_s']:.2f} | {r['peak_rss_mb']:.0f} "
                  f"| {r['cpu_s']:.1f} | {r['failed_pod_creates']} |")
        if args.only:
            return 0
        print("\n| TrainingJobs | kiln / floor, p50 | p95 | all Jobs | Pod p50 | Pod p95 | all Pods |")
        print("|---|---|---|---|---|---|---|")
        for n in sorted({r["n"] for r in rows}):
            # Round by round (each pair ran back to back), then the median over rounds.
            kiln = [r for r in rows if r["n"] == n and r["operator"] == "kiln"]
            floor = [r for r in rows if r["n"] == n and r["operator"] == "floor"]
            ratios = {m: [k[m] / f[m] for k, f in zip(kiln, floor, strict=True)] for m in METRICS}
            for m in ratios:
                ratios[m].append(statistics.median(ratios[m]))
            for i in range(len(kiln) + (1 if len(kiln) > 1 else 0)):
                label = f"{n} (round {i + 1})" if i < len(kiln) else f"{n} (median)"
                if len(kiln) == 1:
                    label = str(n)
                print(f"| {label} | " + " | ".join(f"{ratios[m][i]:.2f}x" for m in METRICS) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
