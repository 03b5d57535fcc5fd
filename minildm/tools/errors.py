"""The command line's error boundary: every error that ends a command becomes one or two lines on
stderr and a documented exit status (EXIT_CODES_HELP, also in `--help` and docs/command-line.md);
a traceback appears only for a bug, or with --debug. minildm/__main__.py runs every command inside
`error_boundary`.
"""

import os
import sys
from contextlib import contextmanager

EXIT_CODES_HELP = """exit statuses:
  0    done (compare: the traces agree)
  1    compare: the traces part; download: a file could not be fetched or verified
  2    bad input: an argument, a file or a config value, which the message names
  3    a file could not be read or written (a full disk, a read-only folder, ...)
  4    a result was not finite; the message says where
  5    under torchrun: another process of the run stopped (its own error says why)
  70   a bug in minildm: please report it (--debug shows the traceback)
  130  interrupted (Ctrl-C)
  141  the program reading the output stopped reading (as | head does)"""


class CommandFailed(SystemExit):
    """The command ended with `status` after printing `message` to stderr (str() gives it)."""

    def __init__(self, message: str, status: int):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe(error: BaseException, command: str | None) -> tuple[str, int]:
    """-> (what to print, the exit status of EXIT_CODES_HELP) for an error that ended `command`."""
    if isinstance(error, KeyboardInterrupt):
        if command == "train":
            return "interrupted: run the same command again to resume from its last checkpoint", 130
        return "interrupted", 130
    if isinstance(error, BrokenPipeError):
        return "", 141
    # minildm checks its inputs and says what is wrong with ValueError and FileNotFoundError
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError)):
        return f"error: {error}", 2
    if isinstance(error, FloatingPointError):
        return f"error: {error}", 4
    # torch.distributed's errors (DistError and its kinds): a rank waited for one that is gone
    if any(kind.__name__ == "DistError" for kind in type(error).__mro__):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (
            f"error: another process of this torchrun run stopped or cannot be reached "
            f"({type(error).__name__}: {first_line[:200]}); its own error, above or in its log, "
            "says why" + (": run the same command again to resume" if command == "train" else ""),
            5,
        )
    if isinstance(error, OSError):  # the disk, the file system, the permissions
        said = error.strerror or str(error)
        return f"error: {error.filename}: {said}" if error.filename else f"error: {said}", 3
    return (
        f"internal error: {type(error).__name__}: {error}\n"
        "This is a bug in minildm: please report it with the command you ran "
        "(add --debug to see where it happened).",
        70,
    )


@contextmanager
def error_boundary(command: str | None, debug: bool):
    """Every error that ends a command becomes describe()'s lines and status; --debug lets the
    error (and its traceback) through instead."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as error:
        if debug or isinstance(error, SystemExit):
            raise
        message, status = describe(error, command)
        if isinstance(error, BrokenPipeError):  # nothing more reaches the reader, not even a flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if message:
            print(message, file=sys.stderr)
        raise CommandFailed(message, status) from None
