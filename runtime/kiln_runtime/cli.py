"""``kiln-run ARTIFACT --input NAME=FILE.npy [--output-dir DIR]``: the arguments of ``kiln run``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .host import IncompatibleHostError
from .manifest import ArtifactError
from .model import load
from .tvm_lib import RuntimeLibraryError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``kiln run`` and ``kiln-run`` share (one definition)."""
    parser.add_argument("artifact", type=Path, help="artifact .tar.gz or its unpacked directory")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input tensor (repeat for each input)")
    parser.add_argument("--output-dir", type=Path, default=None, help="write outputs as output_N.npy here")


class UsageError(ValueError):
    """A command-line argument is malformed."""


def read_inputs(pairs: list[str]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` pairs -> named arrays (``.npy`` files only, never pickles)."""
    feeds: dict[str, np.ndarray] = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name or not path:
            raise UsageError(f"--input must be NAME=FILE.npy, got {pair!r}")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--input {name}: cannot read {path} as a .npy array ({exc})") from None
    return feeds


def run_command(args: argparse.Namespace) -> int:
    """Load the artifact, run it on the inputs, report (stderr) and save the outputs; 2 on a user error."""
    try:
        feeds = read_inputs(args.input)
        model = load(args.artifact)
        outputs = model.run(feeds)
    except (UsageError, ArtifactError, IncompatibleHostError, RuntimeLibraryError, ValueError) as exc:
        print(f"kiln-run: {exc}", file=sys.stderr)
        return 2
    for index, value in enumerate(outputs):
        print(f"output {index}: shape {tuple(value.shape)} dtype {value.dtype}", file=sys.stderr)
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            np.save(args.output_dir / f"output_{index}.npy", value)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln-run", description="Run a Kiln artifact on inputs")
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
