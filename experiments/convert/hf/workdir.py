"""Atomic workdir/output-directory writes and HF config reading."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from experiments.runtime.workdir_lock import check_workdir


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a directory")
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (a HF model directory has config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A temp directory beside `out`, renamed to `out` when the block succeeds.

    `out` must not exist or be an empty directory; nothing is left on failure.
    """
    check_workdir(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
