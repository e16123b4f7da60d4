"""What every command-line script shares: one-line errors and exit statuses.

    from experiments.runtime import cli

    @cli.entry_point
    def main(argv: list[str] | None = None) -> int:
        parser = cli.ArgumentParser(description=...)
        ...

A configuration or input mistake (a `ValueError`, a gin error, a missing input
file, a workdir that is a file, ...) is printed as one line, `error: ...`,
naming the parameter or file, and the script exits with status 2. `--verbose`
(added by `ArgumentParser`) prints the traceback first. An exception with an
integer `exit_code` attribute (`CliError`, `WorkdirLockedError`: 3, the
trainer's non-finite loss: 4, ...) is printed the same way and exits with that
status. Anything else is a bug and escapes with its traceback.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import gin

from experiments.runtime import paths

USAGE_ERROR = 2
INTERRUPTED = 130
VERBOSE_FLAG = "--verbose"

# Input errors reported as one line. Other OSErrors (a full disk, an I/O
# error) are not configuration mistakes and keep their traceback.
# gin raises ValueError (and GinConfigError, a ValueError) for bad bindings.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 FileExistsError, PermissionError)
# gin appends one such line per configurable on the call stack, innermost first.
_GIN_CALL = re.compile(r"^\s*In call to configurable '([^']+)'")
_LEADING_NAME = re.compile(r"^([A-Za-z_]\w*)(?=[\s\[=(:,]|$)")


class CliError(Exception):
    """An error a script reports as one line, exiting with `exit_code`."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a `--verbose` flag and one-line usage errors (exit status 2).

    A flag value that is a bucket path (`gs://...`) is refused unless the flag is
    named in `remote_ok`: only the scripts that go through
    `experiments.runtime.paths` read and write buckets (docs/training.md).
    """

    def __init__(self, *args: Any, remote_ok: Sequence[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.remote_ok = frozenset(remote_ok)
        self.add_argument(VERBOSE_FLAG, action="store_true",
                          help="On an error, print the full traceback too.")

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        for dest, value in vars(parsed).items():
            values = value if isinstance(value, list) else [value]
            remote = [v for v in values if isinstance(v, str) and paths.is_remote(v)]
            if remote and dest not in self.remote_ok:
                self.error(f"--{dest} {remote[0]!r}: {self.prog} reads and writes local "
                           f"files only (gs:// paths work with scripts/train.py, upcycle.py, "
                           f"analyze_routing.py and prepare_data.py --verify)")
        return parsed, rest

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def exit_code(error: BaseException) -> int | None:
    """The exit status a script reports `error` with, or None for a bug."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, _INPUT_ERRORS):
        return USAGE_ERROR
    if isinstance(error, TypeError) and _GIN_CALL.search(str(error).split("\n", 1)[-1] or ""):
        return USAGE_ERROR  # e.g. a gin binding of the wrong type
    return None


def one_line(error: BaseException) -> str:
    """`error`'s message on one line; gin's "In call to configurable 'C'" notes
    become the parameter's full name (`C.param must ...`) or a trailing `(in C)`."""
    if isinstance(error, KeyboardInterrupt) and not str(error):
        return "interrupted"
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    configurables = [m.group(1) for line in lines if (m := _GIN_CALL.match(line))]
    message = " ".join(line for line in lines if not _GIN_CALL.match(line))
    message = message or type(error).__name__
    if configurables:
        message = _qualify(message, configurables[0], configurables[1:])
    return message


def _qualify(message: str, selector: str, callers: Sequence[str]) -> str:
    name = selector.rsplit(".", 1)[-1]
    if name in message:
        return message
    match = _LEADING_NAME.match(message)
    if match and match.group(1) in _parameters(selector):
        # A caller's binding that feeds it (e.g. the deprecated TransformerLM.k).
        via = [f"{c}.{match.group(1)}" for c in callers if _is_bound(c, match.group(1))]
        return f"{name}.{message}" + (f" (set by {', '.join(via)})" if via else "")
    if match and match.group(1).isupper():  # a gin macro, e.g. MESH_SHAPE
        return message
    return f"{message} (in {name})"


def _is_bound(selector: str, parameter: str) -> bool:
    try:
        gin.query_parameter(f"{selector}.{parameter}")
    except ValueError:
        return False
    return True


def _parameters(selector: str) -> set[str]:
    entry = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    if entry is None:
        return set()
    fn = entry.wrapped
    try:
        return set(inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters)
    except (TypeError, ValueError):
        return set()


def report(error: BaseException, *, verbose: bool = False) -> int:
    """Prints `error` as one line (after its traceback when `verbose`); returns its status.
    Re-raises an error that is not a configuration or input mistake."""
    code = exit_code(error)
    if code is None:
        raise error
    if verbose:
        traceback.print_exception(error)
    print(f"error: {one_line(error)}", file=sys.stderr)
    return code


def entry_point(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a script's `main(argv=None)`: errors become one line and an exit status."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else list(argv)
        try:
            return main(argv) or 0
        except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
            return report(e, verbose=VERBOSE_FLAG in args)

    return wrapper


def fail(message: str, exit_code_: int = USAGE_ERROR) -> NoReturn:
    """Stops the script with a one-line error."""
    raise CliError(message, exit_code_)
