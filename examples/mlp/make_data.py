"""Generate the MLP example's dataset: 1000 features, 10 classes, a learnable (linear) rule.

Deterministic: the same --rows and --seed always give the same file.
Usage: python examples/mlp/make_data.py [--rows 5000] [--out examples/mlp/data.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make(rows: int, seed: int = 0, features: int = 1000, classes: int = 10,
         informative: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Rows x features of standard normal noise, labelled by the argmax of a fixed random projection
    of the first `informative` features (the rest is noise the network must learn to ignore)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((features, classes))
    w[:informative] = rng.normal(size=(informative, classes))
    x = rng.normal(size=(rows, features)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int64")
    return x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "data.npz"))
    a = p.parse_args()
    x, y = make(a.rows, a.seed)
    np.savez(a.out, x=x, y=y)
    print(f"wrote {a.out}: x {x.shape}, y {y.shape}, classes {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main()
