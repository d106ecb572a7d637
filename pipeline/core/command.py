"""What every command shares: the one family of errors a user can fix, and the shell that reports them.
(The argument parser every command uses, with --config, --help-config and overrides, is config.py's
CommandParser.)

An error a user can fix (a bad config key, a missing file, storage that cannot be reached, a checkpoint
that does not fit) derives from `UserError`. A command's `main` is wrapped by `command`: a `UserError`
becomes one line `error: <message>` on stderr and exit code 2, Ctrl-C exit code 130; anything else is a
bug and keeps its traceback.

This module imports nothing of ours but redaction.py (every module that defines an error imports it) and nothing heavy
(no torch, Ray, MLflow), so `--help` and `--help-config` are fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from pipeline.core.redaction import redact

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
    _stop_ray()
    cause = getattr(err, "cause", None)  # Ray's RayTaskError re-raises a task's UserError with the task's
    if isinstance(cause, UserError):  # traceback in its text; the original, in .cause, is the one line
        err = cause
    print(f"error: {redact(one_line(err)) or type(err).__name__}", file=sys.stderr, flush=True)


def _stop_ray() -> None:
    """Stop a Ray this process started before the error is printed: at exit, Ray's log monitor still forwards
    its processes' last words (a gcs_server's actor clean-up), which would bury the error line under them."""
    ray = sys.modules.get("ray")  # only if the command imported it: this module imports nothing heavy
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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
