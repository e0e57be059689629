"""Permutation feature importance (`spec.output.explain: true`) on the held-out rows, through the exported model.

Why permutation importance on held-out rows through model.onnx: it needs nothing but predictions,
so it explains the very file that is served (preprocessing, selection and PCA included, raw
columns in) on rows training never saw. Importance of a column = how much the first metric of
`spec.training.metrics` (else the loss-free mse) gets worse when that column is shuffled among the
rows, the mean over `REPEATS` seeded shuffles; about 0 means the model does not use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.spec import TrainingJobSpec
from kiln_trainer import export
from kiln_trainer.errors import SpecError

REPEATS = 5
MAX_ROWS = 1000
TOP = 5


def check(spec: TrainingJobSpec) -> None:
    """Explanations name columns of flat rows; image pixels are not features a reader can act on."""
    shape = spec.model.input_shape if spec.model else []
    if spec.output.explain and len(shape) != 1:
        raise SpecError(f"explain ranks the columns of flat feature rows (inputShape [N]), not inputShape {list(shape)}",
                        "spec.output.explain")


def importance(onnx_path: Path, x: np.ndarray, y: np.ndarray, names: list[str], metric: str, loss: str,
               seed: int) -> dict[str, Any]:
    """explanations.json: the baseline score and, per column, the mean and std of its drop, most important first."""
    x, y = x[:MAX_ROWS], y[:MAX_ROWS]
    sign = 1.0 if metric in export.HIGHER_IS_BETTER else -1.0

    def score(rows: np.ndarray) -> float:
        return export.evaluate(export.onnx_predict(onnx_path, rows), y, [metric], loss)[metric]

    base = score(x)
    rng = np.random.default_rng(seed)
    names = names if len(names) == x.shape[1] else [f"x[{i}]" for i in range(x.shape[1])]
    rows: list[dict[str, Any]] = []
    for j, name in enumerate(names):
        drops = []
        for _ in range(REPEATS):
            shuffled = x.copy()
            shuffled[:, j] = shuffled[rng.permutation(len(x)), j]
            drops.append(sign * (base - score(shuffled)))
        rows.append({"feature": name, "importance": float(np.mean(drops)), "std": float(np.std(drops))})
    rows.sort(key=lambda r: -float(r["importance"]))
    return {"method": "permutation", "metric": metric, "baseline": base, "rows": len(x), "repeats": REPEATS,
            "features": rows}


def top(explanations: dict[str, Any], n: int = TOP) -> list[dict[str, Any]]:
    """For status.result.topFeatures: the n most important columns."""
    return [{"feature": r["feature"], "importance": r["importance"]} for r in explanations["features"][:n]]


def plot(explanations: dict[str, Any], path: Path, n: int = 20) -> None:
    """explanations.png: a horizontal bar per column (the top n), with the std over the shuffles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = explanations["features"][:n][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.barh([r["feature"] for r in rows], [r["importance"] for r in rows], xerr=[r["std"] for r in rows],
            color="tab:blue")
    ax.set_xlabel(f"drop of held-out {explanations['metric']} when shuffled")
    ax.set_title("permutation feature importance")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
