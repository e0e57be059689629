"""Bring your own code: the wrapper's environment, result validation and termination messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.trainer import manifest, subprocess_env, write_manifest

pytestmark = pytest.mark.training  # runs the trainer's wrapper as a process

SCRIPT = """
import json, os, sys
out = os.environ["KILN_OUTPUT_DIR"]
keys = ["KILN_SPEC", "KILN_OUTPUT_DIR", "KILN_OUTPUT_URI", "KILN_TRAININGJOB", "KILN_NAMESPACE",
        "KILN_TERMINATION_LOG", "TF_CONFIG"]
json.dump({k: os.environ.get(k) for k in keys}, open(os.path.join(out, "env.json"), "w"))
mode = sys.argv[1]
if mode == "fail":
    sys.exit(3)
if mode == "ok":
    open(os.path.join(out, "model.onnx"), "wb").write(b"onnx bytes")
    json.dump({"metrics": {"accuracy": 0.9}, "parityMaxAbsDiff": 0.0}, open(os.path.join(out, "result.json"), "w"))
if mode == "bad":
    json.dump({"metrics": {"accuracy": "high"}}, open(os.path.join(out, "result.json"), "w"))
"""


def _setup(tmp: Path, mode: str) -> tuple[Path, Path]:
    (tmp / "train.py").write_text(SCRIPT)
    doc = manifest(command=[sys.executable, str(tmp / "train.py")], args=[mode])
    doc["metadata"]["namespace"] = "team-a"
    for key in ("dataset", "model", "training"):
        del doc["spec"][key]
    return write_manifest(tmp, doc), tmp / "out"


def _byo(tmp: Path, mode: str, **env: str) -> tuple[int, dict | None, Path]:
    spec, out = _setup(tmp, mode)
    term = tmp / "term"
    e = subprocess_env(KILN_SPEC=str(spec), KILN_OUTPUT_DIR=str(out), KILN_OUTPUT_URI="pvc://models/run1",
                       KILN_TERMINATION_LOG=str(term), KILN_TRAININGJOB="byo", KILN_NAMESPACE="team-a", **env)
    cmd = [sys.executable, "-m", "kiln_trainer.byo", "--", sys.executable, str(tmp / "train.py"), mode]
    proc = subprocess.run(cmd, env=e, cwd=tmp, capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(term.read_text()) if term.exists() else None, out


def test_success_validates_result_and_writes_termination_message(tmp_path: Path) -> None:
    code, term, out = _byo(tmp_path, "ok", KILN_WORKER_HOSTS="a:1,b:2", JOB_COMPLETION_INDEX="0")
    assert code == 0
    env = json.loads((out / "env.json").read_text())
    assert env["KILN_SPEC"] == str(tmp_path / "tj.yaml") and env["KILN_OUTPUT_DIR"] == str(out)
    assert env["KILN_OUTPUT_URI"] == "pvc://models/run1" and env["KILN_TRAININGJOB"] == "byo"
    assert env["KILN_NAMESPACE"] == "team-a" and env["KILN_TERMINATION_LOG"] == str(tmp_path / "term")
    assert json.loads(env["TF_CONFIG"])["cluster"]["worker"] == ["a:1", "b:2"]
    assert term["metrics"] == {"accuracy": 0.9}
    assert term["modelUri"] == "pvc://models/run1/model.onnx" and len(term["onnxSha256"]) == 64


def test_failing_command_keeps_its_exit_code(tmp_path: Path) -> None:
    code, term, _ = _byo(tmp_path, "fail")
    assert code == 3
    assert term == {"error": term["error"], "field": "spec.command"} and "exit code 3" in term["error"]


def test_missing_or_invalid_result_is_a_spec_error(tmp_path: Path) -> None:
    code, term, out = _byo(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path, "none")
    assert code == 2 and "wrote no result.json" in term["error"]
    (tmp_path / "b").mkdir()
    code, term, out = _byo(tmp_path / "b", "bad")
    assert code == 2 and "metrics.accuracy" in term["error"] and term["field"] == "spec.command"
    assert not (out / "result.json").exists()


def test_kiln_train_runs_a_command_spec(tmp_path: Path, kiln_train) -> None:
    spec, out = _setup(tmp_path, "ok")
    run = kiln_train(spec, output=out)
    assert run.code == 0, run.err
    env = json.loads((out / "env.json").read_text())
    assert env["KILN_SPEC"] == str(spec.resolve()) and env["KILN_TRAININGJOB"] == "t"
    assert run.termination["metrics"] == {"accuracy": 0.9}
    assert run.termination["modelUri"] == (out / "model.onnx").resolve().as_uri()


def test_no_command_is_an_error(tmp_path: Path) -> None:
    term = tmp_path / "term"
    proc = subprocess.run([sys.executable, "-m", "kiln_trainer.byo"], env=subprocess_env(KILN_TERMINATION_LOG=str(term)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and json.loads(term.read_text())["field"] == "spec.command"
