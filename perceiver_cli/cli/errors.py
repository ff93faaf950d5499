"""The one place where known errors become a one-line message and a non-zero exit code.

Set PERCEIVER_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps

import typer

from ..checkpoint import CheckpointError
from ..codecs import CodecError


class UsageError(Exception):
    """Bad options or arguments that typer itself cannot detect (e.g. a prompt longer than the context)."""


# exit code per error kind: 2 usage, 3 bad input data, 4 checkpoint, 5 missing file, 130 interrupted
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, 2),
    (ValueError, 2),
    (CodecError, 3),
    (CheckpointError, 4),
    (FileNotFoundError, 5),
    (FileExistsError, 6),
    (OSError, 5),
)


def exit_code_for(error: BaseException) -> int | None:
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None


def report_errors(command: Callable) -> Callable:
    """Decorator for every command: known errors → `error: message` on stderr and an exit code."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as error:
            code = exit_code_for(error)
            if code is None or os.environ.get("PERCEIVER_DEBUG"):
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(code) from None

    return wrapper
