"""Trainer overhead: `kiln train` against a plain Keras script doing the same training on the same data.

Both run as fresh processes (TensorFlow import included), alternating, several repeats; the report
gives median wall times and the ratio kiln/plain. What `kiln train` adds on top of training: data
cleaning and its report, per-epoch checkpoints, TensorBoard logs, progress lines, ONNX export with the
parity check, model.keras, metrics/history JSON, the curves plot and the atomic commit of outputs.

Usage: .venv/bin/python bench/train_overhead.py [--rows 30000] [--epochs 10] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "mlp"))
from make_data import make  # noqa: E402

PLAIN = '''
import os, sys
import numpy as np
import keras

data = np.load(sys.argv[1])
x, y = data["x"].astype("float32"), data["y"]
epochs, seed, out = int(sys.argv[2]), 7, sys.argv[3]
keras.utils.set_random_seed(seed)
order = np.random.default_rng(seed).permutation(len(x))
n_val = round(len(x) * 0.2)
tr, va = order[: len(x) - n_val], order[len(x) - n_val :]
model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
model.compile(keras.optimizers.Adam(0.001), "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x[tr], y[tr], validation_data=(x[va], y[va]), epochs=epochs, batch_size=32, verbose=0)
model.save(os.path.join(out, "model.keras"))
'''


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    """Wall and CPU seconds of one process, and the phase timings `kiln train` prints (`timings: data=1.0s ...`).

    CPU time is reported too because wall time on a shared machine swings with other people's load.
    """
    cpu0, start = _cpu_children(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took, cpu = time.perf_counter() - start, _cpu_children() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    phases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("timings: "):
            phases = {k: float(v.rstrip("s")) for k, v in (item.split("=") for item in line.split()[1:])}
    return took, cpu, phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the report here (e.g. bench/results/train_overhead.json)")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        x, y = make(a.rows)
        np.savez(work / "data.npz", x=x, y=y)
        manifest = (ROOT / "examples" / "mlp" / "trainingjob.yaml").read_text()
        manifest = manifest.replace("epochs: 10", f"epochs: {a.epochs}")
        (work / "tj.yaml").write_text(manifest)
        (work / "plain.py").write_text(PLAIN)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "TF_CONFIG"))}
        env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
        kiln_cmd = [sys.executable, "-m", "kiln.cli", "train", str(work / "tj.yaml"), "--output", str(work / "out")]
        plain_out = work / "plain-out"
        plain_out.mkdir()
        plain_cmd = [sys.executable, str(work / "plain.py"), str(work / "data.npz"), str(a.epochs), str(plain_out)]
        times: dict[str, list[float]] = {"kiln": [], "plain": []}
        cpus: dict[str, list[float]] = {"kiln": [], "plain": []}
        phases: dict[str, list[float]] = {}
        for i in range(a.repeats):
            order = [("kiln", kiln_cmd), ("plain", plain_cmd)]
            for name, cmd in order if i % 2 == 0 else order[::-1]:
                took, cpu, ph = _run(cmd, env)
                times[name].append(took)
                cpus[name].append(cpu)
                for k, v in ph.items():
                    phases.setdefault(k, []).append(v)
                print(f"repeat {i + 1}: {name} {took:.1f}s wall, {cpu:.1f}s cpu", flush=True)
        result = json.loads((work / "out" / "result.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kiln, plain = statistics.median(times["kiln"]), statistics.median(times["plain"])
    report = {
        "rows": a.rows, "epochs": a.epochs, "repeats": a.repeats, "cpus": os.cpu_count(),
        "kilnSeconds": times["kiln"], "plainSeconds": times["plain"],
        "kilnMedian": round(kiln, 2), "plainMedian": round(plain, 2), "ratio": round(kiln / plain, 3),
        "overheadShareOfKilnWall": round((kiln - plain) / kiln, 3),
        "minRatio": round(min(times["kiln"]) / min(times["plain"]), 3),
        "kilnCpuSeconds": cpus["kiln"], "plainCpuSeconds": cpus["plain"],
        "cpuRatio": round(statistics.median(cpus["kiln"]) / statistics.median(cpus["plain"]), 3),
        "kilnPhaseMedians": {k: round(statistics.median(v), 2) for k, v in phases.items()},
        "heldoutAccuracy": result["metrics"].get("heldout_accuracy"), "parityMaxAbsDiff": result["parityMaxAbsDiff"],
    }
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"median kiln {kiln:.1f}s, plain {plain:.1f}s, ratio {kiln / plain:.3f} "
          f"({'OK' if kiln / plain <= 1.10 else 'OVER'} the 1.10 budget)")


if __name__ == "__main__":
    main()
