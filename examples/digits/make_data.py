"""Write scikit-learn's bundled `load_digits` (8x8 images, 1797 rows, no download) as digits.csv.

Columns p0..p63 (pixel intensities 0-16, row-major) and `label` (0-9). The CSV is committed; this
script documents where it came from and regenerates it byte for byte.
Usage: python examples/digits/make_data.py [--out examples/digits/digits.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    from sklearn.datasets import load_digits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "digits.csv"))
    a = p.parse_args()
    digits = load_digits()
    with open(a.out, "w") as f:
        f.write(",".join([f"p{i}" for i in range(64)] + ["label"]) + "\n")
        for row, label in zip(digits.data, digits.target, strict=True):
            f.write(",".join(str(int(v)) for v in row) + f",{int(label)}\n")
    print(f"wrote {a.out}: {len(digits.target)} rows")


if __name__ == "__main__":
    main()
