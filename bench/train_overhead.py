"""Trainer overhead: `kiln train` against a plain Keras script doing what the article does, on the same data.

The plain script is the article's MLP run: load the arrays, hold out the same 20 % (the same seeded
shuffle), build 1000 -> 64 -> 64 -> 10, adam 0.001, fit 10 epochs of batch 32 with validation, then
`model.save("model.keras")`. `kiln train` runs examples/mlp/trainingjob.yaml (the same model, data,
split, epochs and batch size) and additionally cleans the data and reports it, checkpoints every
epoch, writes TensorBoard scalars and progress lines, exports ONNX and runs the parity check, and
writes metrics/history/curves/result atomically.

Both run as fresh processes (interpreter, TensorFlow import and exit included), pinned the same way
(`taskset -c CPU`, one core by default so the two sides cannot differ in how many cores they got),
alternating which goes first, `--rounds` rounds; each round is a pair run back to back, so the
per-round ratio compares two runs that saw about the same machine load. Both print per-phase wall and
CPU seconds (`timings:` / `cpu timings:` lines), which the report puts side by side.

Two scopes (see docs/benchmarks.md):
  (a) train-to-saved-model: everything `kiln train` does except the ONNX export and its parity check
      (and other formats), against the plain script's whole run: budget 5 %;
  (b) the ONNX export + parity cost, reported separately: it is the product (the served model), which
      the plain script does not make at all.

Usage: .venv/bin/python bench/train_overhead.py [--rows 30000] [--epochs 10] [--rounds 5] [--cpu 1]
                                                [--json bench/results/train_overhead.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "mlp"))
from make_data import make  # noqa: E402

BUDGET = 1.05
# Phases of `kiln train` that make the ONNX model and prove it (scope b); all others are scope a.
EXPORT_PHASES = ("onnx", "parity", "formats")

PLAIN = '''
import time
wall0, cpu0 = time.perf_counter(), time.process_time()
wall, cpu = {}, {"startup": cpu0}
def lap(name):
    global wall0, cpu0
    w, c = time.perf_counter(), time.process_time()
    wall[name], cpu[name], wall0, cpu0 = w - wall0, c - cpu0, w, c

import os, sys
import numpy as np
import keras
import tensorflow as tf
lap("import")
data = np.load(sys.argv[1])
x, y = data["x"].astype("float32"), data["y"]
epochs, out, seed = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None
if seed is not None:  # what `kiln train` does with spec.training.seed: fixed seeds and op determinism
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
order = np.random.default_rng(seed).permutation(len(x))
n_val = round(len(x) * 0.2)
tr, va = order[: len(x) - n_val], order[len(x) - n_val :]
x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
lap("data")
model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
model.compile(keras.optimizers.Adam(0.001), "sparse_categorical_crossentropy", metrics=["accuracy"])
lap("prepare")
model.fit(x_tr, y_tr, validation_data=(x_va, y_va), epochs=epochs, batch_size=32, verbose=0)
lap("fit")
model.save(os.path.join(out, "model.keras"))
lap("save")
print("timings: " + " ".join(f"{k}={v:.2f}s" for k, v in wall.items()))
print("cpu timings: " + " ".join(f"{k}={v:.2f}s" for k, v in cpu.items()))
'''


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _phases(stdout: str, prefix: str) -> dict[str, float]:
    for line in stdout.splitlines():
        if line.startswith(prefix):
            return {k: float(v.rstrip("s")) for k, v in (item.split("=") for item in line[len(prefix):].split())}
    return {}


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall and CPU seconds of one process and the per-phase timings it printed."""
    cpu0, start = _cpu_children(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took, cpu = time.perf_counter() - start, _cpu_children() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"wall": took, "cpu": cpu, "phases": _phases(proc.stdout, "timings: "),
            "cpuPhases": _phases(proc.stdout, "cpu timings: ")}


def _scope_a(run: dict[str, Any], key: str) -> float:
    """The run's seconds without the ONNX export and parity phases."""
    phases = run["phases" if key == "wall" else "cpuPhases"]
    return float(run[key] - sum(phases.get(p, 0.0) for p in EXPORT_PHASES))


def _median_phases(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    names = list(dict.fromkeys(k for r in runs for k in r[key]))
    return {k: round(statistics.median(r[key].get(k, 0.0) for r in runs), 3) for k in names}


def _ratios(kiln: list[dict[str, Any]], plain: list[dict[str, Any]], key: str) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    ratio = [k[key] / p[key] for k, p in zip(kiln, plain, strict=True)]
    ratio_a = [_scope_a(k, key) / p[key] for k, p in zip(kiln, plain, strict=True)]
    beyond_fit = [(k[key] - k[_PH[key]].get("fit", 0.0)) - (p[key] - p[_PH[key]].get("fit", 0.0))
                  for k, p in zip(kiln, plain, strict=True)]
    return {
        "kilnMedian": med([k[key] for k in kiln]), "plainMedian": med([p[key] for p in plain]),
        "ratioWhole": med(ratio), "ratioTrainToSaved": med(ratio_a),
        "exportAndParitySeconds": med([k[key] - _scope_a(k, key) for k in kiln]),
        "fitKilnMinusPlain": med([k[_PH[key]].get("fit", 0.0) - p[_PH[key]].get("fit", 0.0)
                                  for k, p in zip(kiln, plain, strict=True)]),
        "outsideFitKilnMinusPlain": med(beyond_fit),
        "ratioWholeRounds": [round(r, 3) for r in ratio], "ratioTrainToSavedRounds": [round(r, 3) for r in ratio_a],
    }


_PH = {"wall": "phases", "cpu": "cpuPhases"}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side medians and paired (same round) ratios; `before` is the baseline checkout when given."""
    sides = {name: [r[name] for r in rounds] for name in ("kiln", "plain", "before") if name in rounds[0]}
    out: dict[str, Any] = {key: _ratios(sides["kiln"], sides["plain"], key) for key in ("wall", "cpu")}
    if "before" in sides:
        out["before"] = {key: _ratios(sides["before"], sides["plain"], key) for key in ("wall", "cpu")}
        out["kilnOverBefore"] = {key: round(statistics.median(k[key] / b[key] for k, b in zip(
            sides["kiln"], sides["before"], strict=True)), 3) for key in ("wall", "cpu")}
    for name, runs in sides.items():
        out[f"{name}Phases"] = {"wall": _median_phases(runs, "phases"), "cpu": _median_phases(runs, "cpuPhases")}
    return out


VARIANTS = ("seeded", "unseeded")


def _prepare(work: Path, rows: int, epochs: int) -> None:
    x, y = make(rows)
    np.savez(work / "data.npz", x=x, y=y)
    manifest = (ROOT / "examples" / "mlp" / "trainingjob.yaml").read_text().replace("epochs: 10", f"epochs: {epochs}")
    assert "    seed: 7\n" in manifest
    (work / "seeded.yaml").write_text(manifest)
    (work / "unseeded.yaml").write_text(manifest.replace("    seed: 7\n", ""))
    (work / "plain.py").write_text(PLAIN)
    (work / "plain-out").mkdir()


def _commands(work: Path, epochs: int, pin: list[str], variant: str, baseline: bool) -> dict[str, list[str]]:
    """`kiln train` on the example manifest and the plain script; `seeded`: both fix seed 7 (kiln then turns
    TensorFlow op determinism on, so the plain script does too), `unseeded`: neither does. `before`: the
    same `kiln train` with --baseline's sources first on PYTHONPATH (an earlier checkout)."""
    seed = ["7"] if variant == "seeded" else []
    kiln = [*pin, sys.executable, "-m", "kiln.cli", "train", str(work / f"{variant}.yaml"), "--output", str(work / "out")]
    cmds = {"kiln": kiln, "plain": [*pin, sys.executable, str(work / "plain.py"), str(work / "data.npz"), str(epochs),
                                    str(work / "plain-out"), *seed]}
    if baseline:
        cmds["before"] = kiln
    return cmds


def _round(i: int, cmds: dict[str, dict[str, list[str]]], envs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """One round: per variant the sides back to back; the order of sides rotates and of variants alternates."""
    one: dict[str, Any] = {"loadBefore": os.getloadavg()}
    variants = list(cmds) if i % 2 == 0 else list(cmds)[::-1]
    for variant in variants:
        sides = list(cmds[variant])
        shift = i % len(sides)
        order = sides[shift:] + sides[:shift]
        pair: dict[str, Any] = {"order": order}
        for name in order:
            pair[name] = _run(cmds[variant][name], envs[name])
        one[variant] = pair
        print(f"round {i + 1} {variant} ({' then '.join(order)}): " + ", ".join(
            f"{n} {pair[n]['wall']:.1f}s wall {pair[n]['cpu']:.1f}s cpu" for n in sides)
            + f", load {os.getloadavg()[0]:.2f}", flush=True)
    one["loadAfter"] = os.getloadavg()
    return one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu", default="1", help="taskset CPU list both sides run on ('' to not pin)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="seeded, unseeded or both (comma-separated)")
    p.add_argument("--baseline", help="PYTHONPATH of an earlier checkout's kiln_trainer: adds side `before`")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "train_overhead.json"))
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    pin = ["taskset", "-c", a.cpu] if a.cpu else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "TF_CONFIG"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    variants = [v for v in a.variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: pick from {', '.join(VARIANTS)}")
    cmds = {v: _commands(work, a.epochs, pin, v, bool(a.baseline)) for v in variants}
    envs = {"kiln": env, "plain": env, "before": {**env, "PYTHONPATH": a.baseline or ""}}
    rounds: list[dict[str, Any]] = []
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        _prepare(work, a.rows, a.epochs)
        for i in range(a.rounds):
            rounds.append(_round(i, cmds, envs))
        result = json.loads((work / "out" / "result.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "meta": {"started": started, "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "rows": a.rows, "epochs": a.epochs, "rounds": a.rounds, "pinnedTo": a.cpu or None,
                 "cpus": os.cpu_count(), "budget": BUDGET, "loadFirst": rounds[0]["loadBefore"],
                 "loadLast": rounds[-1]["loadAfter"],
                 "command": f"bench/train_overhead.py --rows {a.rows} --epochs {a.epochs} --rounds {a.rounds} "
                            f"--cpu '{a.cpu}' --variants {','.join(variants)}" + (f" --baseline {a.baseline}" if a.baseline else "")},
        **{v: _summary([r[v] for r in rounds]) for v in variants},
        "heldoutAccuracy": result["metrics"].get("heldout_accuracy"), "parityMaxAbsDiff": result["parityMaxAbsDiff"],
        "rounds": rounds,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=2))
    for v in variants:
        for key in ("wall", "cpu"):
            s = report[v][key]
            print(f"{v} {key}: kiln {s['kilnMedian']:.2f}s, plain {s['plainMedian']:.2f}s; median round ratio whole run "
                  f"{s['ratioWhole']:.3f}, train-to-saved-model {s['ratioTrainToSaved']:.3f} "
                  f"({'OK' if s['ratioTrainToSaved'] <= BUDGET else 'OVER'} the {BUDGET:.2f} budget); "
                  f"ONNX export + parity {s['exportAndParitySeconds']:.2f}s; kiln-plain: fit {s['fitKilnMinusPlain']:+.2f}s, "
                  f"outside fit {s['outsideFitKilnMinusPlain']:+.2f}s")
            if "before" in report[v]:
                b = report[v]["before"][key]
                print(f"  before: kiln {b['kilnMedian']:.2f}s, ratio whole {b['ratioWhole']:.3f}, train-to-saved "
                      f"{b['ratioTrainToSaved']:.3f}; now/before {report[v]['kilnOverBefore'][key]:.3f}")


if __name__ == "__main__":
    main()
