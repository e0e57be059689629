"""Bring your own code: run the user's `spec.command` + `spec.args` under Kiln's contract.

Usage in the pod: `python -m kiln_trainer.byo -- COMMAND [ARGS...]` (what the operator renders), or
`kiln train FILE` on a spec with `command` (local runs). The child gets the documented environment
(KILN_SPEC, KILN_OUTPUT_DIR, KILN_OUTPUT_URI, KILN_TRAININGJOB, KILN_NAMESPACE, TF_CONFIG,
KILN_TERMINATION_LOG). It must write `result.json` (the `status.result` object) into
KILN_OUTPUT_DIR; the wrapper validates it against the CRD schema and writes the termination message.
Why a wrapper: the operator then reads the same message format from every training pod.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kiln import DEFAULT_OUTPUT_DIR
from kiln_trainer import distributed, outputs, runtime, storage
from kiln_trainer.errors import EXIT_RETRYABLE, EXIT_SPEC, SpecError, TrainerError
from kiln_trainer.jobspec import Job


def _result_schema() -> dict[str, Any]:
    from kiln.schema import openapi_schema

    schema: dict[str, Any] = openapi_schema("TrainingJob")["properties"]["status"]["properties"]["result"]
    return schema


def validate_result(path: Path, out_dir: Path, loc: storage.Location) -> dict[str, Any]:
    """Read and check the user's result.json; fill modelUri/onnxSha256 from model.onnx when left out."""
    import jsonschema

    if not path.exists():
        raise SpecError(f"the command succeeded but wrote no {path.name} in $KILN_OUTPUT_DIR ({out_dir})", "spec.command")
    try:
        result = json.loads(path.read_text())
    except ValueError as exc:
        raise SpecError(f"{path.name} is not valid JSON: {exc}", "spec.command") from exc
    if not isinstance(result, dict):
        raise SpecError(f"{path.name} must hold a JSON object (the status.result fields)", "spec.command")
    model = out_dir / "model.onnx"
    if model.exists():
        result.setdefault("modelUri", loc.public_uri("model.onnx", out_dir))
        result.setdefault("onnxSha256", storage.sha256(model))
    known = {k: v for k, v in result.items() if k in outputs.RESULT_KEYS}
    errors = sorted(jsonschema.Draft4Validator(_result_schema()).iter_errors(known), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path)
        raise SpecError(f"{path.name}: {where or '(root)'}: {errors[0].message}", "spec.command")
    return result


def child_env(job: Job | None, spec_path: Path | None, out_dir: Path, out_uri: str,
              termination: Path | None) -> dict[str, str]:
    """The documented environment of the user's process."""
    env = dict(os.environ)
    if spec_path is not None:
        env["KILN_SPEC"] = str(spec_path.resolve())
    env["KILN_OUTPUT_DIR"] = str(out_dir)
    env["KILN_OUTPUT_URI"] = out_uri
    if job is not None:
        env.setdefault("KILN_TRAININGJOB", job.name)
        if job.namespace:
            env.setdefault("KILN_NAMESPACE", job.namespace)
    if termination is not None:
        env["KILN_TERMINATION_LOG"] = str(termination)
    return env


def execute(command: list[str], env: dict[str, str], out_dir: Path, loc: storage.Location,
            termination: Path | None, chief: bool = True) -> int:
    """Run the user's command, forward SIGTERM/SIGINT, then validate its result; returns the exit code."""
    stale = out_dir / outputs.RESULT
    storage.rmtree_quiet(stale)
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as exc:
        err = SpecError(f"cannot start {command[0]!r}: {exc.strerror or exc}", "spec.command")
        print(f"kiln byo: error: {err}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(str(err), err.field), termination)
        return EXIT_SPEC
    forward = {s: signal.signal(s, lambda sig, _f: proc.send_signal(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, old in forward.items():
            signal.signal(s, old)
    if code != 0:
        storage.rmtree_quiet(stale)
        reason = f"signal {-code}" if code < 0 else f"exit code {code}"
        msg = f"the command {command[0]!r} failed with {reason}"
        print(f"kiln byo: error: {msg}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(msg, "spec.command"), termination)
        return code if 0 < code < 256 else EXIT_RETRYABLE
    if not chief:
        return 0
    try:
        result = validate_result(stale, out_dir, loc)
        if loc.is_remote:
            names = [p.name for p in out_dir.iterdir()]
            storage.upload_dir(out_dir, loc, names, "spec.output.uri")
    except TrainerError as exc:
        storage.rmtree_quiet(stale)
        print(f"kiln byo: error: {exc}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(str(exc), exc.field), termination)
        return exc.exit_code
    outputs.write_termination(outputs.summary(result), termination)
    return 0


def run(job: Job, output: str | None, termination: Path | None) -> int:
    """`kiln train` on a spec with `command`: run it with the contract's environment."""
    cluster = distributed.setup()
    loc, out_dir = outputs.resolve_output(job, output)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [*(job.typed.command or []), *(job.typed.args or [])]
    env = child_env(job, job.source, out_dir, loc.uri, termination)
    return execute(command, env, out_dir, loc, termination, cluster.chief)


def main(argv: list[str] | None = None) -> int:
    """`python -m kiln_trainer.byo -- COMMAND [ARGS...]` inside the training pod."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    runtime.prepare_environment()
    termination = outputs.termination_path()
    if not args:
        print("usage: python -m kiln_trainer.byo -- COMMAND [ARGS...]", file=sys.stderr)
        outputs.write_termination(outputs.failure_message("no command given", "spec.command"), termination)
        return EXIT_SPEC
    try:
        from kiln_trainer.jobspec import DEFAULT_SPEC_PATH, load_job

        spec_path = Path(os.environ.get("KILN_SPEC", DEFAULT_SPEC_PATH))
        job = load_job(spec_path) if spec_path.exists() else None
        cluster = distributed.setup()
        out_dir = Path(os.environ.get("KILN_OUTPUT_DIR") or Path.cwd() / DEFAULT_OUTPUT_DIR)
        uri = os.environ.get("KILN_OUTPUT_URI") or ((job.typed.output.uri or "") if job else "")
        loc = (storage.Location(uri, remote=uri) if uri.startswith("s3://")
               else storage.Location(uri, path=out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
    except TrainerError as exc:
        print(f"kiln byo: error: {exc}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(str(exc), exc.field), termination)
        return exc.exit_code
    env = child_env(job, spec_path if job else None, out_dir, uri, termination)
    return execute(args, env, out_dir, loc, termination, cluster.chief)


if __name__ == "__main__":
    sys.exit(main())
