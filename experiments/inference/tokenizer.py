"""A workdir's tokenizer and end-of-sequence ids (scoring, generation, lm-eval).

An imported model keeps its own tokenizer: the importer copies `TOKENIZER_FILES`
into the workdir, the upcycler copies them on to the MoE workdir and the
exporter back out. `workdir_tokenizer` prefers those files over the run's data
tokenizer (`DataConfig.tokenizer`), so `scripts/score.py --text` and the
lm-eval adapter encode text the way the model was trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.data.config import DataConfig
from experiments.data.tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer, make_tokenizer
from experiments.runtime import paths

# Files of a HF model directory that travel with the model (import, upcycle, export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")

# Tokenizer files stored in a workdir, in order of precedence, each with its
# loader; they win over `DataConfig.tokenizer` (an imported model keeps its own).
WORKDIR_TOKENIZERS: dict[str, Callable[[Path], Tokenizer]] = {
    "tokenizer.json": HFTokenizer,
    "tokenizer.model": lambda path: SentencePieceTokenizer(str(path)),
}


def copy_tokenizer_files(src: paths.PathLike, dst: paths.PathLike) -> list[str]:
    """Copies the `TOKENIZER_FILES` present in `src` into `dst` (either may be
    `gs://`); returns their names."""
    src, dst = paths.as_path(src), paths.as_path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            paths.write_bytes(dst / name, (src / name).read_bytes())
            copied.append(name)
    return copied


def workdir_tokenizer(workdir: str | Path) -> Tokenizer:
    """The tokenizer file stored in the workdir (`WORKDIR_TOKENIZERS`, first
    present wins: `tokenizer.json` through the `tokenizers` package, then a
    SentencePiece `tokenizer.model`), else the run's `DataConfig.tokenizer`
    (for that fallback the workdir's config.gin must be parsed, as
    `load_scorer`/`restore_model` do)."""
    for name, load in WORKDIR_TOKENIZERS.items():
        path = paths.as_path(workdir) / name
        if path.is_file():
            return load(paths.local_copy(path))  # the tokenizer libraries read local files
    return make_tokenizer(DataConfig().tokenizer)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def workdir_eos_ids(workdir: str | Path, tokenizer: Tokenizer | None = None) -> list[int]:
    """The ids that end a generation: `eos_token_id` (an int or a list) of the
    workdir's `generation_config.json`, else of the imported `config.json` kept
    in `hf_import.json`, else the tokenizer's EOS (`[]` when it has none).

    `tokenizer` defaults to `workdir_tokenizer(workdir)`.
    """
    workdir = Path(workdir)
    ids = _ids(_json(workdir / "generation_config.json").get("eos_token_id"))
    if not ids:
        ids = _ids(_json(workdir / "hf_import.json").get("config", {}).get("eos_token_id"))
    if not ids:
        eos = (tokenizer or workdir_tokenizer(workdir)).eos_id
        ids = [eos] if eos >= 0 else []
    return list(dict.fromkeys(ids))
