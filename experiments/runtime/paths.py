"""One path type for local directories and object storage (`gs://bucket/...`).

Workdirs (checkpoints, TensorBoard logs, `metrics.jsonl`, configs, summaries,
analyses) and prepared corpora (`shards:<dir>`) may live in a bucket. Every
path on those code paths goes through :func:`as_path`, an `etils.epath.Path`:
a plain local path (made absolute) or a `gs://` one, served by `gcsfs` (the
`gcs` extra: `pip install -e '.[gcs]'`). `gcsfs` and the Google client
libraries honour `STORAGE_EMULATOR_HOST`, and tensorstore (orbax's array
writer) `TENSORSTORE_GCS_HTTP_URL`: that is how the tests run everything
against a local emulator (docs/training.md, "Workdir and corpus in a bucket").

What differs on an object store, and how this module hides it:

- No atomic rename: :func:`write_text` / :func:`write_bytes` write a local file
  through a temporary file and `os.replace`; an object is uploaded in one request
  and appears whole or not at all, so no temporary object is needed.
- No append: `metrics.jsonl` is rewritten whole when flushed
  (`experiments.reporting.metrics`).
- No directories: `mkdir` is a no-op there, and a "directory" exists once an
  object lies under it.
- No `flock`: the workdir lock is a lease object (`experiments.runtime.lease`).

A piece that cannot work on an object store calls :func:`require_local`, which
refuses a `gs://` path with one line naming the piece and why.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
from typing import Union

from etils import epath

Path = epath.Path
PathLike = Union[str, os.PathLike]  # noqa: UP007  (a runtime alias)
REMOTE_PREFIXES = ("gs://",)
GCS_EXTRA = "pip install -e '.[gcs]'"


class RemotePathError(ValueError):
    """A `gs://` path was given to a piece that only works on local files."""


class MissingGcsSupportError(ImportError):
    """A `gs://` path without the packages that serve it (the `gcs` extra)."""

    exit_code = 2  # a usage error for the scripts (experiments.runtime.cli)


def is_remote(path: PathLike) -> bool:
    """Whether `path` names object storage (`gs://...`) rather than a local file."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: local paths absolute, `gs://` ones as given
    (MissingGcsSupportError naming the `gcs` extra when gcsfs is missing)."""
    text = os.fspath(path)
    if is_remote(text):
        check_gcs_support(text)
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def check_gcs_support(path: PathLike) -> None:
    """ImportError unless the packages that serve `gs://` paths are installed."""
    missing = [name for name in ("gcsfs", "google.cloud.storage") if not _has_module(name)]
    if missing:
        raise MissingGcsSupportError(f"{os.fspath(path)!r}: gs:// paths need {' and '.join(missing)} "
                          f"(the gcs extra: {GCS_EXTRA})")
    import fsspec  # pylint: disable=g-import-not-at-top

    # Objects are written behind gcsfs's back (tensorstore writes orbax's arrays):
    # a cached directory listing would miss them.
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require_local(path: PathLike, piece: str, why: str) -> None:
    """RemotePathError naming `piece` and `why` when `path` is on object storage."""
    if is_remote(path):
        raise RemotePathError(f"{piece} cannot use {os.fspath(path)!r}: {why}; "
                              f"give it a local path")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` whole: a local file through a temporary file and
    `os.replace` (a reader never sees half of it); an object in one upload."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)  # the mode `open` would give (mkstemp's is 0600)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, os.fspath(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """`write_bytes` of `text` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def file_size(path: PathLike) -> int:
    """The size of the file or object `path`, in bytes."""
    path = as_path(path)
    if is_remote(path):
        return int(filesystem(path).size(os.fspath(path)))
    return os.stat(os.fspath(path)).st_size


def read_range(path: str, start: int, stop: int) -> bytes:
    """Bytes `start:stop` of the object `path` (one ranged GET; may return fewer
    at the end of the object)."""
    return filesystem(path).cat_file(path, start=start, end=stop)


def find_files(directory: PathLike) -> list[epath.Path]:
    """Every file under `directory` (recursively; on object storage, every object
    under the prefix), sorted; [] when there is none."""
    directory = as_path(directory)
    if is_remote(directory):
        protocol = os.fspath(directory).split("://", 1)[0] + "://"
        found = filesystem(directory).find(os.fspath(directory))
        return sorted(epath.Path(protocol + p) for p in found)
    return sorted(epath.Path(root) / name
                  for root, _, files in os.walk(os.fspath(directory)) for name in files)


def local_copy(path: PathLike) -> pathlib.Path:
    """A local file with the contents of `path`: `path` itself when it is local, else
    a copy downloaded into a new temporary directory (same file name), for
    libraries that only open local files (tokenizers, SentencePiece)."""
    if not is_remote(path):
        return pathlib.Path(path)
    target = pathlib.Path(tempfile.mkdtemp(prefix="sparse_moe_")) / as_path(path).name
    target.write_bytes(as_path(path).read_bytes())
    return target


def move_tree(source: PathLike, target: PathLike) -> None:
    """Moves a directory: a rename (`shutil.move`) locally; on object storage a copy of every
    object, then the deletion of the originals (there is no rename)."""
    source, target = as_path(source), as_path(target)
    if is_remote(source) or is_remote(target):
        if not (is_remote(source) and is_remote(target)):
            raise RemotePathError(f"cannot move {source} to {target}: one is local, one is not")
        filesystem(source).mv(os.fspath(source), os.fspath(target), recursive=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(source), os.fspath(target))


def filesystem(path: PathLike):  # -> fsspec.AbstractFileSystem
    """The fsspec filesystem serving the remote `path` (gcsfs for `gs://`)."""
    import fsspec  # pylint: disable=g-import-not-at-top

    check_gcs_support(path)
    # The arguments etils.epath uses: fsspec hands out the same cached instance.
    return fsspec.filesystem("gcs", finalize_on_close=True)
