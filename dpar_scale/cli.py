"""What every entry point shares: a user's mistake fails in one line, a bug keeps its traceback.

An entry point (train.py, tools/*.py, launchers/*.py) builds its parser with `parser(__doc__)`, wraps its
`main(argv=None) -> int` in `@entry_point`, and imports heavy modules (torch, deepspeed) only after the arguments
are parsed, so `--help` and argument mistakes answer at once:

    from dpar_scale.cli import UsageError, entry_point, existing_path, parser, positive_int

    @entry_point
    def main(argv=None) -> int:
        p = parser(__doc__)
        p.add_argument("--codes", type=existing_path, required=True)
        p.add_argument("--batch-size", type=positive_int, default=64)
        args = p.parse_args(argv)
        import torch  # noqa: E402 - after parsing
        if wrong_combination(args):
            raise UsageError("--a and --b cannot be combined: ...")
        ...
        return 0

    if __name__ == "__main__":
        sys.exit(main())

The rule `entry_point` applies: a `DparError` (ConfigError, ShardError, CheckpointError, LaunchError,
ExtractError, MissingFileError, a tool's own error class: derive it from DparError), an argument mistake
(`UsageError`, which the parser raises instead of printing argparse's usage block; the `existing_*` argument types
reject a missing file at parse time) or a PermissionError is the user's to fix: it is printed as
`error: <message>` on one line of stderr and `main` returns 2. Any other exception propagates with its traceback.
Under torchrun / Slurm only global rank 0 prints: the checks agree across ranks before raising (as the data and
checkpoint checks do). An error that one rank may raise alone sets `shared = False` (see dpar_scale.errors); every
rank that raises it prints `error (rank N): ...`.

Imports only the standard library and dpar_scale.errors.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from typing import Callable

from dpar_scale.errors import DparError

__all__ = ["USER_ERRORS", "UsageError", "entry_point", "parser", "one_line", "report", "write_json_report", "positive_int",
           "non_negative_int", "positive_float", "fraction", "existing_path", "existing_file", "existing_dir"]


class UsageError(DparError):
    """A command-line argument that is out of range, names a missing file, or does not combine with another."""


# Ours (DparError, MissingFileError included) and a file the OS will not let us read or write (the user's
# environment; the message names the path). A bare FileNotFoundError or KeyError is a bug: it keeps its traceback.
USER_ERRORS = (DparError, PermissionError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints a usage block and exits; we raise one clear line instead
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser(doc: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose mistakes raise UsageError (one line through `entry_point`); the module docstring
    is shown by --help as written, and the program is named after the calling file (also when a test imports the
    tool and calls its main)."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    caller = sys._getframe(1).f_globals.get("__file__")
    if caller and "prog" not in kwargs:
        kwargs["prog"] = os.path.basename(caller)
    return _Parser(description=doc, **kwargs)


def write_json_report(path: str | None, payload: dict) -> None:
    """A tool's `--json PATH` result (benchmarks, checks), its folder made; nothing when no path was given."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps(payload, indent=2) + "\n")


def one_line(message: str) -> str:
    """A multi-line message (e.g. a list of problems) joined into one line."""
    return re.sub(r":;\s", ": ", re.sub(r"\s*\n\s*", "; ", message.strip()))


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def report(err: BaseException) -> None:
    """`error: <message>` on stderr, once: by rank 0, or by the raising rank for a DparError with shared=False."""
    rank, shared = _rank(), getattr(err, "shared", True)
    if rank != 0 and shared:
        return
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    text = text[len("error: "):] if text.startswith("error: ") else text
    where = "" if shared else f" (rank {rank})"
    print(f"error{where}: {one_line(text)}", file=sys.stderr, flush=True)


def _destroy_process_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway; the user's error is what matters
            pass


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps `main(argv=None) -> int`: user errors (USER_ERRORS) are reported as one line and return 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            report(err)
            _destroy_process_group()
            return 2

    return wrapper


# ------------------------------------------------------------------------------------- argument types
def _number(kind, check: Callable, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    convert.__name__ = what  # argparse names the type in its messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a number > 0")
fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _path(check: Callable[[str], bool], what: str):
    def convert(text: str) -> str:
        if not check(text):
            state = "is not a " + what if os.path.exists(text) else "does not exist"
            raise argparse.ArgumentTypeError(f"{text} {state}")
        return text

    convert.__name__ = what
    return convert


existing_path = _path(os.path.exists, "file or folder")
existing_file = _path(os.path.isfile, "file")
existing_dir = _path(os.path.isdir, "folder")
