"""`kiln train`: the command line of the built-in trainer (and the container's entry point).

Exit codes: 0 success, 2 spec or data errors a retry cannot fix, 1 anything else. In a pod the
outcome also goes to the termination message file as JSON (see docs/trainer.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback

from kiln_trainer import outputs, runtime
from kiln_trainer.errors import EXIT_RETRYABLE, Terminated, TrainerError

USAGE = "kiln train [FILE] [--output DIR_OR_URI] [--name NAME] [--in-cluster]"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln train", usage=USAGE,
                                description="Train a TrainingJob with Kiln's built-in TensorFlow trainer.")
    p.add_argument("file", nargs="?", help="TrainingJob manifest; without it the mounted spec ($KILN_SPEC) is used")
    p.add_argument("--output", "-o", help="output folder or URI; overrides spec.output.uri")
    p.add_argument("--name", help="which TrainingJob of FILE to train (default: the first)")
    p.add_argument("--in-cluster", action="store_true",
                   help="pod mode: read $KILN_SPEC (default /etc/kiln/trainingjob.yaml), write to $KILN_OUTPUT_DIR")
    return p


def _on_sigterm(signum: int, frame: object) -> None:
    """Pod deletion or preemption: unwind through the normal error path (staged outputs are removed)."""
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one training; returns the process exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return _main(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    runtime.prepare_environment()
    from kiln_trainer.progress import setup_logging

    setup_logging()
    term = outputs.termination_path()
    try:
        from kiln_trainer import jobspec

        job = jobspec.load_job(args.file, args.name)
        if job.typed.command:
            from kiln_trainer import byo

            return byo.run(job, output=args.output, termination=term)
        from kiln_trainer import api

        result, chief = api.run_job(job, output=args.output)
        if chief:
            outputs.write_termination(outputs.summary(result), term)
        return 0
    except TrainerError as exc:
        print(f"kiln train: error: {exc}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(str(exc), exc.field), term)
        return exc.exit_code
    except Terminated as exc:
        print(f"kiln train: error: {exc.message}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(exc.message, None), term)
        return exc.exit_code
    except KeyboardInterrupt:
        outputs.write_termination(outputs.failure_message("interrupted", None), term)
        return 130
    except Exception as exc:
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        msg = msg if len(msg) <= 400 else msg[:400] + "..."
        print(f"kiln train: error: {' '.join(msg.split())}", file=sys.stderr, flush=True)
        outputs.write_termination(outputs.failure_message(msg, None), term)
        return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main())
