"""What `scripts/generate.py` does between its flags and the engine.

Input checks that need no model run first, so a bad flag or batch file fails
in a fraction of a second: `check_max_new_tokens`, `sampling_config` (the
engine's `SamplingConfig`, its errors naming the flag), `parse_eos_ids`,
`read_batch_file`. Then `encode_requests` turns the requests into token ids
(text through the workdir's tokenizer) and refuses ids outside the model's
vocabulary, and `result_records` builds one output record per prompt.

Each mistake is a `ValueError` whose message names the flag, the batch-file
line and key, or the prompt; the script prints it as one `error:` line and
exits with status 2 (`experiments.runtime.cli`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.data.tokenizers import Tokenizer
from experiments.inference.sampling import SamplingConfig

BATCH_KEYS = ("prompt", "prompt_ids")
NO_EOS = "none"


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt: text (encoded with the workdir's tokenizer) or token ids.

    `where` names it in error messages ("--prompt_ids", "prompts.jsonl:3").
    """

    index: int
    where: str
    text: str | None = None
    ids: tuple[int, ...] | None = None


def parse_ids(text: str, flag: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; refuses anything but comma-separated integers."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def check_max_new_tokens(value: int) -> int:
    if value <= 0:
        raise ValueError(f"--max_new_tokens must be >= 1, got {value}")
    return value


def sampling_config(temperature: float, top_k: int | None, top_p: float | None) -> SamplingConfig:
    """The engine's `SamplingConfig`; its error, which names the field, names the flag."""
    try:
        return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    except ValueError as e:
        message = str(e)
        for field in ("temperature", "top_k", "top_p"):
            if message.startswith(field) or message.startswith(f"SamplingConfig.{field}"):
                message = (f"--{field}" + message.split(field, 1)[1]).replace(
                    "must be None or ", "must be ")
                break
        raise ValueError(message) from None


def parse_eos_ids(text: str | None) -> list[int] | None:
    """`--eos_ids`: None (unset: the workdir's EOS ids), 'none' -> [] (never stop
    early), else comma-separated ids."""
    if text is None:
        return None
    if text.strip().lower() == NO_EOS:
        return []
    try:
        ids = parse_ids(text, "--eos_ids")
    except ValueError:
        ids = []
    if not ids:
        raise ValueError(f"--eos_ids must be comma-separated integers or {NO_EOS!r}, got {text!r}")
    return ids


def _batch_record(record: Any, where: str, index: int) -> Request:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with one of the keys "
                         f"{BATCH_KEYS}, got {type(record).__name__}")
    unknown = [key for key in record if key not in BATCH_KEYS]
    if unknown:
        raise ValueError(f"{where}: key {unknown[0]!r} is not one of {BATCH_KEYS}")
    if len(record) != 1:
        raise ValueError(f"{where}: give exactly one of the keys {BATCH_KEYS}, "
                         f"got {sorted(record) or 'none'}")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f"{where}: key 'prompt' must be a string, "
                             f"got {type(record['prompt']).__name__}")
        return Request(index, where, text=record["prompt"])
    ids = record["prompt_ids"]
    if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{where}: key 'prompt_ids' must be a list of integers, got {ids!r}")
    return Request(index, where, ids=tuple(ids))


def read_batch_file(path: str | Path) -> list[Request]:
    """A JSONL file, one prompt a line: `{"prompt": "text"}` or
    `{"prompt_ids": [1, 2, 3]}`; blank lines are skipped. Requests keep the
    file's order; errors name the file, the line number and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--batch_file: {path} is not a file")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        requests.append(_batch_record(record, where, len(requests)))
    if not requests:
        raise ValueError(f"--batch_file: {path} holds no prompts")
    return requests


def check_vocab_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    for token in ids:
        if not 0 <= token < vocab_size:
            raise ValueError(f"{what}: token id {token} is outside the vocabulary "
                             f"[0, {vocab_size})")


def encode_requests(requests: Sequence[Request], vocab_size: int,
                    tokenizer: Callable[[], Tokenizer]) -> list[list[int]]:
    """`[n_i]` token ids per request; text is encoded with `tokenizer()` (called
    once, only when a request has text). Refuses empty prompts and ids outside
    [0, vocab_size)."""
    loaded = None
    prompts = []
    for request in requests:
        if request.ids is not None:
            ids = list(request.ids)
        else:
            loaded = loaded or tokenizer()
            ids = list(loaded.encode(request.text))
        if not ids:
            raise ValueError(f"{request.where}: the prompt is empty (generation needs at "
                             f"least 1 token)")
        check_vocab_ids(ids, vocab_size, request.where)
        prompts.append(ids)
    return prompts


def result_records(requests: Sequence[Request], prompts: Sequence[Sequence[int]],
                   outputs: Sequence[Sequence[int]], eos_ids: Sequence[int],
                   decode: Callable[[Sequence[int]], str | None] | None) -> list[dict[str, Any]]:
    """One record per prompt: `prompt` (its index), `prompt_ids`, `ids` (the
    new tokens only), `stop` ('eos' when the last new token is an EOS id, else
    'length'), and `text` (the new tokens decoded) where `decode` gives one."""
    records = []
    for request, prompt, new in zip(requests, prompts, outputs, strict=True):
        record: dict[str, Any] = {"prompt": request.index, "prompt_ids": list(prompt),
                                  "ids": [int(t) for t in new],
                                  "stop": "eos" if new and new[-1] in eos_ids else "length"}
        text = decode(record["ids"]) if decode is not None else None
        if text is not None:
            record["text"] = text
        records.append(record)
    return records


def text_decoder(tokenizer: Callable[[], Tokenizer]) -> Callable[[Sequence[int]], str | None]:
    """`ids -> text` with the workdir's tokenizer, or None where there is no
    tokenizer or it cannot decode those ids (then records carry no `text`)."""
    try:
        loaded = tokenizer()
    except (ValueError, OSError, ImportError):
        loaded = None

    def decode(ids: Sequence[int]) -> str | None:
        if loaded is None:
            return None
        try:
            return loaded.decode(list(ids))
        except (ValueError, IndexError, KeyError):
            return None

    return decode
