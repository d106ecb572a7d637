"""What every command shares: the one family of errors a user can fix, the shell that reports them,
and the argument parser with `--config`, `--help-config` and `section.key=value` overrides.

An error a user can fix (a bad config key, a missing file, storage that cannot be reached, a checkpoint
that does not fit) derives from `UserError`. A command's `main` is wrapped by `command`: a `UserError`
becomes one line `error: <message>` on stderr and exit code 2, Ctrl-C exit code 130; anything else is a
bug and keeps its traceback.

This module imports nothing heavy (no torch, Ray, MLflow), so `--help` and `--help-config` are fast.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can fix (config, input, storage, checkpoint, ...): reported as one line, exit 2."""


def one_line(message: object) -> str:
    """A message on one line: `invalid config:\\n  a\\n  b` -> `invalid config: a; b`."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, rest = lines[0], lines[1:]
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def report(err: BaseException) -> None:
    print(f"error: {one_line(err) or type(err).__name__}", file=sys.stderr, flush=True)


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main(argv): its return value is the exit code (None: 0); a UserError is reported
    as `error: <message>` (one line) with exit code 2, KeyboardInterrupt exits 130."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            code = main(argv)
        except UserError as err:
            report(err)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        return 0 if code is None else code

    return run


HELP_CONFIG = ("print every config key (dotted), its type, the value in force for the preset and the "
               "overrides given, and what it does; then exit")


class CommandParser(argparse.ArgumentParser):
    """argparse with what every stage command takes: --config PRESET, --help-config and positional
    `section.key=value` overrides. With --help-config no argument is required (as with --help), so
    `eval/run.py --help-config` works without --ckpt."""

    def __init__(self, *args: Any, preset_help: str | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        if preset_help is None:
            from pipeline.core.config import PRESET_HELP
            preset_help = PRESET_HELP
        self.add_argument("--config", help=preset_help)
        self.add_argument("--help-config", action="store_true", help=HELP_CONFIG)

    def add_overrides(self) -> None:
        """The trailing `section.key=value` arguments (added last, so they read last in --help)."""
        self.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="override any config key, e.g. train.lr=3e-4 (see --help-config)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        if "--help-config" in args:
            for action in self._actions:
                action.required = False
        return super().parse_args(args, namespace)


def help_config(args: argparse.Namespace, cfg: Any) -> bool:
    """With --help-config: print the config reference of `cfg` (the config in force) and return True, so
    the command returns 0 before any work."""
    if not getattr(args, "help_config", False):
        return False
    from pipeline.core.config import reference

    print(reference(cfg), flush=True)
    return True
