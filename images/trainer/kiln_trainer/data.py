"""The trainer's data pipeline: load a dataset (CSV, NPZ, Parquet), clean it and report what was dropped.

Why here and not in the model: cleaning decides which rows exist (duplicates, missing labels, rows
with missing features under `missingValues: drop`); what can be done per row at serving time
(imputation, normalization) lives in the exported graph instead (see preprocess.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.spec import Dataset as DatasetSpec
from kiln.spec import TrainingJobSpec
from kiln_trainer.errors import DataError, SpecError

FORMATS = ("csv", "npz", "parquet")
_EXTENSIONS = {".csv": "csv", ".npz": "npz", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class DataReport:
    """How many rows were read, dropped (and why) and kept; printed and written to data-report.json."""

    source: str
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows_kept: int = 0
    rows_imputed: int = 0
    features: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # what the trainer did to the columns/rows afterwards

    def line(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in self.dropped.items())
        total = sum(self.dropped.values())
        text = f"data: read {self.rows_read} rows from {self.source}; dropped {total} ({reasons}); kept {self.rows_kept}"
        if self.rows_imputed:
            text += f"; {self.rows_imputed} rows with missing features kept for imputation"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rowsRead": self.rows_read,
            "dropped": dict(self.dropped),
            "rowsKept": self.rows_kept,
            "rowsImputed": self.rows_imputed,
            "features": list(self.features),
            **self.extra,
        }


@dataclass
class Dataset:
    """Clean examples shaped like `inputShape` (float32, NaN where imputation will fill in) and labels."""

    x: np.ndarray
    y: np.ndarray
    report: DataReport
    classes: list[str] | None = None


def infer_format(path: Path, declared: str | None) -> str:
    """The dataset format: the declared one, else from the file extension."""
    if declared:
        if declared not in FORMATS:
            raise SpecError(f"unknown format {declared!r} (known: {', '.join(FORMATS)})", "spec.dataset.format")
        return declared
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise SpecError(
            f"cannot infer the format of {path.name!r} from its extension; set it to one of {', '.join(FORMATS)}",
            "spec.dataset.format",
        )
    return fmt


def _read_table(path: Path, fmt: str) -> Any:
    import pandas as pd

    try:
        df = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path.name} is empty") from exc
    except Exception as exc:
        raise DataError(f"cannot read {path.name} as {fmt}: {type(exc).__name__}: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _table_arrays(df: Any, name: str, ds: DatasetSpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Feature matrix (float64 with NaN) and raw label column of a CSV/Parquet table."""
    import pandas as pd

    columns = list(df.columns)
    label = ds.label_column
    if label not in columns:
        raise DataError(
            f"column {label!r} not in {name} (columns: {', '.join(columns)})", "spec.dataset.labelColumn"
        )
    wanted = ds.feature_columns or [c for c in columns if c != label]
    for i, col in enumerate(wanted):
        if col not in columns:
            raise DataError(
                f"column {col!r} not in {name} (columns: {', '.join(columns)})", f"spec.dataset.featureColumns[{i}]"
            )
        if col == label:
            raise SpecError(f"column {col!r} is the label column", f"spec.dataset.featureColumns[{i}]")
    if not wanted:
        raise DataError(f"{name} has no feature columns besides the label {label!r}", "spec.dataset.featureColumns")
    where = "spec.dataset.featureColumns"
    feats = []
    for col in wanted:
        series = df[col]
        if series.dtype == bool:
            series = series.astype("float64")
        converted = pd.to_numeric(series, errors="coerce")
        bad = converted.isna() & series.notna()
        if bad.any():
            example = series[bad].iloc[0]
            raise DataError(f"feature column {col!r} in {name} is not numeric (value {example!r})", where)
        feats.append(converted.to_numpy(dtype="float64"))
    x = np.stack(feats, axis=1)
    return x, df[label].to_numpy(), list(wanted)


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "x" not in keys or "y" not in keys:
                raise DataError(f"{path.name} needs arrays 'x' and 'y' (has: {', '.join(keys) or 'none'})")
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path.name} as npz: {type(exc).__name__}: {exc}") from exc
    if x.ndim < 2 or len(x) != len(y):
        raise DataError(f"{path.name}: x has shape {list(x.shape)} and y {list(y.shape)}; need N rows in both")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{path.name}: array 'x' is not numeric (dtype {x.dtype})")
    return x.astype("float32" if x.dtype.itemsize <= 4 else "float64", copy=False), y, ["x"]


def _label_missing(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind in "fc":
        missing: np.ndarray = np.isnan(y).reshape(len(y), -1).any(axis=1)
        return missing
    if y.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in y], dtype=bool)
    return np.zeros(len(y), dtype=bool)


def _duplicates(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows equal (features and label, byte for byte) to an earlier row.

    A hash of each row's bytes finds candidate groups in one integer matrix product; only rows whose
    hashes collide are compared byte for byte, so wide data (images, 1000s of features) stays cheap.
    Why integers: the sum wraps exactly, so equal rows always get equal hashes (a float projection
    could round two equal rows apart), and the product needs no float64 copy of the data (which cost
    most of the data phase on the reference MLP's 30,000 x 1000 rows).
    """
    dup = np.zeros(len(x), dtype=bool)
    if not len(x):
        return dup
    ys = y.reshape(len(y), -1)
    numeric_y = ys.dtype.kind in "biuf"
    words = np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")  # the same bytes as unsigned integers
    weights = np.random.default_rng(0).integers(1, 2**32, size=words.shape[1], dtype=np.uint64).astype(words.dtype)
    key = words @ weights
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    seen: set[bytes] = set()
    for i in candidates:
        k = x[i].tobytes() + (ys[i].tobytes() if numeric_y else repr(ys[i].tolist()).encode())
        if k in seen:
            dup[i] = True
        else:
            seen.add(k)
    return dup


def _encode_labels(y: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """Numeric labels stay as they are; strings become class indices in sorted order."""
    if y.dtype.kind in "biuf":
        return y.astype("float64") if y.dtype.kind == "f" else y.astype("int64"), None
    values = [str(v) for v in y]
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in values], dtype="int64"), classes


def parts(folder: Path, declared: str | None) -> tuple[list[Path], str]:
    """The files of a dataset folder (an `s3://` prefix or a local directory) in name order, all of one
    format; hidden files and markers such as `_SUCCESS` are skipped."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"{folder.name}/ holds no data files")
    formats = {infer_format(f, declared) for f in files}
    if len(formats) > 1:
        raise DataError(f"{folder.name}/ mixes formats ({', '.join(sorted(formats))}); a dataset folder holds one format",
                        "spec.dataset.format")
    return files, formats.pop()


def _arrays(path: Path, ds: DatasetSpec) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """x, y and feature names of a file, or of every part of a folder concatenated in name order."""
    files, fmt = parts(path, ds.format) if path.is_dir() else ([path], infer_format(path, ds.format))
    if fmt == "npz":
        loaded = [_npz_arrays(f) for f in files]
        shapes = {a[0].shape[1:] for a in loaded}
        if len(shapes) > 1:
            raise DataError(f"{path.name}/: parts have examples of different shapes {sorted(map(list, shapes))}")
        return np.concatenate([a[0] for a in loaded]), np.concatenate([a[1] for a in loaded]), ["x"], fmt
    import pandas as pd

    tables = [_read_table(f, fmt) for f in files]
    for f, t in zip(files[1:], tables[1:], strict=True):
        if list(t.columns) != list(tables[0].columns):
            raise DataError(f"{f.name} has columns {list(t.columns)}, {files[0].name} has {list(tables[0].columns)}")
    df = tables[0] if len(tables) == 1 else pd.concat(tables, ignore_index=True)
    x, y, names = _table_arrays(df, path.name, ds)
    return x, y, names, fmt


def load(path: Path, source: str, spec: TrainingJobSpec) -> Dataset:
    """Load and clean the dataset of a TrainingJob spec; examples come back shaped like `inputShape`.
    `path` is one file or a folder of parts (CSV, Parquet or NPZ), read in name order."""
    if spec.dataset is None or spec.model is None:
        raise SpecError("the built-in trainer needs spec.dataset and spec.model (or set spec.command)", "spec")
    ds = spec.dataset
    pp = ds.preprocessing
    x, y, names, fmt = _arrays(path, ds)
    report = DataReport(source=source, rows_read=len(x), features=names)
    flat = x.reshape(len(x), -1)

    keep = ~_label_missing(y)
    report.dropped["missing label"] = int((~keep).sum())
    if pp.drop_duplicates:
        dup = np.zeros(len(x), dtype=bool)
        idx = np.flatnonzero(keep)
        every = len(idx) == len(x)  # the usual case: no copy of the features
        dup[idx] = _duplicates(flat if every else flat[idx], y if every else y[idx])
        report.dropped["duplicates"] = int(dup.sum())
        keep &= ~dup
    missing_feat = np.isnan(flat).any(axis=1)
    if pp.missing_values == "drop":
        report.dropped["missing features"] = int((keep & missing_feat).sum())
        keep &= ~missing_feat
    else:
        report.rows_imputed = int((keep & missing_feat).sum())
    report.rows_kept = int(keep.sum())
    if report.rows_kept == 0:
        worst = max(report.dropped, key=lambda k: report.dropped[k]) if report.rows_read else ""
        fld = {"missing features": "spec.dataset.preprocessing.missingValues",
               "missing label": "spec.dataset.labelColumn"}.get(worst, "spec.dataset.uri")
        raise DataError(f"no rows left: {report.line().removeprefix('data: ')}", fld)

    y_enc, classes = _encode_labels(y[keep])
    shape = [int(d) for d in spec.model.input_shape]
    per_row = int(np.prod(shape))
    if flat.shape[1] != per_row:
        what = f"{flat.shape[1]} feature columns" if fmt != "npz" else f"examples of shape {list(x.shape[1:])}"
        raise SpecError(f"{shape} needs {per_row} values per example but {path.name} has {what}",
                        "spec.model.inputShape")
    kept = flat if report.rows_kept == len(flat) else flat[keep]
    examples = kept.reshape([report.rows_kept, *shape]).astype("float32", copy=False)
    return Dataset(x=examples, y=y_enc, report=report, classes=classes)
