"""Write a 1:9 imbalanced subsample of scikit-learn's bundled breast_cancer (no download) as data.csv.

270 benign rows (label 1) and 30 malignant ones (label 0), 30 numeric features f0..f29, shuffled
with seed 0. The rows left out (87 benign, 182 malignant) go to heldout.csv, to measure the recall
of the rare class on data the model never saw.
Usage: python examples/imbalanced/make_data.py [--out examples/imbalanced]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make(out: Path) -> None:
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    benign, malignant = rng.permutation(np.flatnonzero(y == 1)), rng.permutation(np.flatnonzero(y == 0))
    train = rng.permutation(np.concatenate([benign[:270], malignant[:30]]))
    held = np.concatenate([benign[270:], malignant[30:]])
    for name, rows in (("data.csv", train), ("heldout.csv", held)):
        df = pd.DataFrame(x[rows], columns=[f"f{i}" for i in range(x.shape[1])])
        df["label"] = y[rows]
        df.to_csv(out / name, index=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent))
    make(Path(p.parse_args().out))


if __name__ == "__main__":
    main()
