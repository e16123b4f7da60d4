"""Gin set-up: parse config files and bindings with errors that name the culprit,
and write the resulting configs into the workdir.

Parameters a configurable's caller always passes are denylisted in gin (so a
binding on them is an error, not silently overridden). A configurable may say
where such a value is set with a `gin_set_by` attribute, `{parameter: the
binding to write instead}`; `parse` then names that binding in its error:

    @gin.configurable(denylist=["seq_len"])
    def make_train_iterator(source, *, seq_len, ...): ...
    make_train_iterator.gin_set_by = {"seq_len": "DataConfig.seq_len"}
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import gin

from experiments.runtime import paths

# `include` paths in gin files are resolved against this directory (and the
# including file's own directory), so configs can say `include 'models/x.gin'`.
GIN_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "gin_configs"
CONFIG_FILE = "config.gin"
OPERATIVE_CONFIG_FILE = "operative_config.gin"

_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)
_DENIED = re.compile(r"Configurable '([^']+)' has denylisted kwarg '([^']+)'\.")


class GinConfigError(ValueError):
    """A gin file is missing or a binding does not parse or name a real parameter."""


def included_files(path: paths.PathLike) -> list[str]:
    """The paths a gin file `include`s, as written."""
    return _INCLUDE.findall(paths.as_path(path).read_text(encoding="utf-8"))


def parse(gin_files: Sequence[str], gin_params: Sequence[str],
          search_paths: Sequence[str | Path] = ()) -> None:
    """Parses `gin_files` then `gin_params` (later ones win), refusing unknowns.

    Every configurable referenced must be registered (its module imported)
    before this is called.
    """
    _register_remote_reader()
    for f in gin_files:
        if not paths.as_path(f).is_file():
            raise GinConfigError(f"gin file not found: {f!r} (from --gin_file)")
    local = [f for f in gin_files if not paths.is_remote(f)]
    for directory in [GIN_CONFIGS_DIR, *search_paths, *{Path(f).resolve().parent for f in local}]:
        gin.add_config_file_search_path(str(directory))
    # gin logs an error for every search path an include is not found under
    # before it finds the right one; a missing include still raises below.
    quiet = _DropMessages("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        with _tolerant_existence_checks():
            gin.parse_config_files_and_bindings(list(gin_files), list(gin_params),
                                                skip_unknown=False, finalize_config=False)
    except (ValueError, OSError, SyntaxError) as e:
        raise GinConfigError(f"invalid gin configuration: {explain_denied(str(e))}") from e
    finally:
        logging.getLogger().removeFilter(quiet)


_remote_reader_registered = False


def _register_remote_reader() -> None:
    """Lets gin read `gs://` config files (e.g. a bucket workdir's config.gin)."""
    global _remote_reader_registered
    if _remote_reader_registered:
        return
    _remote_reader_registered = True

    def readable(path: str) -> bool:
        return paths.is_remote(path) and paths.as_path(path).is_file()

    gin.config.register_file_reader(lambda path: paths.as_path(path).open("r"), readable)


def set_by(selector: str, parameter: str) -> str | None:
    """The binding that sets `selector.parameter` instead (its `gin_set_by`), if declared."""
    entry = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    if entry is None:
        return None
    for obj in (entry.wrapper, entry.wrapped):
        where = getattr(obj, "gin_set_by", None)
        if where and parameter in where:
            return where[parameter]
    return None


def explain_denied(message: str) -> str:
    """Rewrites gin's "Configurable 'C' has denylisted kwarg 'p'." into what to do."""
    match = _DENIED.search(message)
    if match is None:
        return message
    selector, parameter = match.groups()
    instead = set_by(selector, parameter)
    text = (f"{selector}.{parameter} cannot be bound: the caller of {selector} always "
            f"sets it" + (f"; bind {instead} instead." if instead else "."))
    return message.replace(match.group(0), text)


@contextlib.contextmanager
def _tolerant_existence_checks():
    """gin asks each registered file reader whether an include exists; its
    package-resource reader raises TypeError instead of answering no when the
    include's first directory is a namespace package on `sys.path` (e.g. a
    `data/` folder in the working directory of a notebook: `include
    'data/x.gin'`). Treat that as "not here" so the search paths are tried."""
    readers = gin.config._FILE_READERS  # pylint: disable=protected-access
    saved = list(readers)

    def tolerant(check):
        def exists(path: str) -> bool:
            try:
                return bool(check(path))
            except (TypeError, ValueError, ImportError):
                return False
        return exists

    readers[:] = [(reader, tolerant(check)) for reader, check in saved]
    try:
        yield
    finally:
        readers[:] = saved


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def write_config(workdir: paths.PathLike) -> paths.Path:
    """Writes every parsed binding to `<workdir>/config.gin` (local or `gs://`)."""
    path = paths.as_path(workdir) / CONFIG_FILE
    paths.write_text(path, gin.config_str())
    return path


def write_operative_config(workdir: paths.PathLike, notes: Iterable[str] = ()) -> paths.Path:
    """Writes the bindings actually used so far to `<workdir>/operative_config.gin`,
    after `notes` as comment lines (e.g. the dispatch the sharding config chose)."""
    path = paths.as_path(workdir) / OPERATIVE_CONFIG_FILE
    header = "".join(f"# {line}\n" for note in notes for line in str(note).splitlines())
    paths.write_text(path, header + gin.operative_config_str())
    return path
