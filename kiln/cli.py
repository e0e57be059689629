"""The `kiln` command: one entry point, each subcommand importing only what its image ships.

`kiln serve` must work in the server image, which has no TensorFlow and no Kopf, so every
subcommand imports its implementation lazily.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """usage: kiln COMMAND [ARGS...]

commands:
  operator   run the Kubernetes operator (Kopf)
  render     print what the operator would create for manifests, as YAML (no cluster)
  train      train a TrainingJob manifest on this machine with the built-in trainer
  serve      serve an ONNX model over the KServe V2 and V1 protocols
  run        local mode: train and serve the manifests in a file on this machine, no cluster
  version    print the version

`kiln COMMAND --help` describes each command.
"""


def _operator(argv: list[str]) -> int:
    from kiln_operator.main import main

    return main(argv)


def _render(argv: list[str]) -> int:
    from kiln_operator.render_cli import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from kiln_trainer.__main__ import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from kiln_server.__main__ import main

    return int(main(argv))


def _run(argv: list[str]) -> int:
    from kiln.local import main

    return main(argv)


def _version(argv: list[str]) -> int:
    from kiln import __version__

    print(__version__)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "operator": _operator,
    "render": _render,
    "train": _train,
    "serve": _serve,
    "run": _run,
    "version": _version,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"kiln: unknown command {args[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
