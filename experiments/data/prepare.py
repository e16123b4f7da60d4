"""Input files -> token shards (the library behind ``scripts/prepare_data.py``).

Plan: the input files (sorted) are cut into units: consecutive files of one format
grouped up to ``shard_bytes`` of input (a larger file alone). Unit i becomes
``shard-<i>`` (format: :mod:`experiments.data.shards`), written by a worker
process into a temporary directory and renamed into place when complete, so a
killed run leaves finished shards and nothing half-written; a rerun with the same
settings skips them. The manifest is written last. The output depends only on
the inputs and the settings, not on the number of workers or on interruptions.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue as queue_lib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.data import corpus, inputs, shards
from experiments.data.files import write_atomically
from experiments.data.tokenizers import encode_to_array, make_tokenizer
from experiments.runtime import paths

DEFAULT_SHARD_BYTES = 128 << 20
_TMP_PREFIX = ".tmp-"


@dataclasses.dataclass(frozen=True)
class Options:
    """What determines the output (the number of workers does not)."""

    tokenizer: str = "byte"
    format: str = "auto"
    fields: inputs.FieldOptions = dataclasses.field(default_factory=inputs.FieldOptions)
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION
    dtype: str = "auto"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    skip_bad_files: bool = False


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard's inputs: `files` as (path, size in bytes), all of one `format`."""

    index: int
    format: str
    files: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return shards.shard_name(self.index)

    @property
    def input_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_units(files: Sequence[str], requested_format: str, shard_bytes: int) -> list[Unit]:
    """Units in file order: consecutive files of one format grouped up to `shard_bytes`
    of input (a larger file is a unit of its own)."""
    if shard_bytes <= 0:
        raise ValueError(f"--shard_bytes must be positive, got {shard_bytes}")
    units: list[Unit] = []
    group: list[tuple[str, int]] = []
    group_format = ""
    for path in files:
        fmt = inputs.file_format(path, requested_format)
        size = os.path.getsize(path)
        if group and (fmt != group_format or sum(s for _, s in group) + size > shard_bytes):
            units.append(Unit(len(units), group_format, tuple(group)))
            group = []
        group.append((path, size))
        group_format = fmt
    if group:
        units.append(Unit(len(units), group_format, tuple(group)))
    return units


# ----------------------------------------------------------------------------- one shard


class _SplitWriter:
    """Tokens of one split of a shard, streamed to `<split>.tokens`."""

    def __init__(self, directory: Path, split: str, dtype: str):
        self.names = shards.split_files(split)
        self.directory = directory
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.file = open(directory / self.names["tokens"], "wb")  # pylint: disable=consider-using-with
        self.offsets = [0]
        self.domains: list[int] = []
        self.byte_counts = np.zeros(256, np.int64)

    def add(self, tokens: np.ndarray, domain: int, text_bytes: bytes) -> None:
        self.file.write(tokens.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(tokens))
        self.domains.append(domain)
        self.byte_counts += np.bincount(np.frombuffer(text_bytes, np.uint8), minlength=256)

    def mark(self) -> tuple[int, np.ndarray]:
        return len(self.offsets), self.byte_counts.copy()

    def rollback(self, mark: tuple[int, np.ndarray]) -> None:
        docs, counts = mark
        del self.offsets[docs:], self.domains[docs - 1:]
        self.byte_counts = counts
        self.file.flush()
        self.file.truncate(self.offsets[-1] * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)

    def close(self) -> dict[str, Any]:
        self.file.close()
        np.save(self.directory / self.names["offsets"], np.asarray(self.offsets, np.int64))
        np.save(self.directory / self.names["domains"], np.asarray(self.domains, np.int32))
        return {"documents": len(self.domains), "tokens": self.offsets[-1],
                "bytes": int(self.byte_counts.sum()), "byte_counts": self.byte_counts.tolist()}


# Where shard writers send progress, (shard name, input bytes, tokens): a callable in
# this process, or the queue to the parent in a worker process (`_init_worker`).
_progress_sink: Callable[[tuple[str, int, int]], None] | None = None
_REPORT_EVERY_S = 0.25


def _init_worker(queue: Any) -> None:
    global _progress_sink  # pylint: disable=global-statement
    _progress_sink = queue.put


class _ShardProgress:
    """A shard's progress, sent at most every `_REPORT_EVERY_S`. Input bytes advance
    with the text of plain (uncompressed) files and at the end of each file."""

    def __init__(self, name: str):
        self.name, self.input_bytes, self.tokens = name, 0, 0
        self.last = time.monotonic()
        self.file_size = self.file_credited = 0
        self.plain = False

    def start_file(self, path: str, size: int, fmt: str) -> None:
        self.file_size, self.file_credited = size, 0
        self.plain = fmt != "parquet" and not path.endswith((".gz", ".zst"))

    def document(self, text_bytes: int, tokens: int) -> None:
        if self.plain:
            step = min(text_bytes, self.file_size - self.file_credited)
            self.file_credited += step
            self.input_bytes += step
        self.tokens += tokens
        if time.monotonic() - self.last > _REPORT_EVERY_S:
            self.send()

    def end_file(self) -> None:
        self.input_bytes += self.file_size - self.file_credited
        self.file_credited = self.file_size

    def send(self) -> None:
        if _progress_sink is not None and (self.input_bytes or self.tokens):
            _progress_sink((self.name, self.input_bytes, self.tokens))
        self.input_bytes = self.tokens = 0
        self.last = time.monotonic()


@dataclasses.dataclass(frozen=True)
class _Task:
    unit: Unit
    output: str
    options: Options
    dtype: str


def write_shard(task: _Task) -> dict[str, Any]:
    """Writes one unit's shard (atomically: temporary directory, then rename); its meta."""
    unit, options = task.unit, task.options
    final = Path(task.output) / unit.name
    tmp = Path(task.output) / f"{_TMP_PREFIX}{unit.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _fill_shard(tmp, unit, options, task.dtype)
        for path in sorted(tmp.iterdir()):
            meta["files"][path.name] = {"bytes": path.stat().st_size,
                                        "sha256": shards.file_sha256(path)}
        write_atomically(tmp / shards.SHARD_META, _dumps(meta))
        if final.exists():  # Not finished (no meta.json): left by hand or another tool.
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _fill_shard(tmp: Path, unit: Unit, options: Options, dtype: str) -> dict[str, Any]:
    tokenizer = make_tokenizer(options.tokenizer)
    writers = {split: _SplitWriter(tmp, split, dtype) for split in shards.SPLITS}
    domain_table: dict[str, int] = {}
    skipped = []
    progress = _ShardProgress(unit.name)
    for path, size in unit.files:
        marks = {split: w.mark() for split, w in writers.items()}
        known_domains = len(domain_table)
        progress.start_file(path, size, unit.format)
        try:
            for doc in inputs.read_documents(path, unit.format, options.fields):
                split = corpus.split_of(doc.key, options.validation_fraction)
                domain = domain_table.setdefault(doc.domain, len(domain_table))
                text_bytes = doc.text.encode("utf-8")
                tokens = encode_to_array(tokenizer, doc.text)
                writers[split].add(tokens, domain, text_bytes)
                progress.document(len(text_bytes), len(tokens))
        except inputs.BadFileError as e:
            if not options.skip_bad_files:
                for w in writers.values():
                    w.file.close()
                raise ValueError(f"{e} (pass --skip_bad_files to skip such files)") from e
            print(f"warning: skipping {e}", file=sys.stderr)
            for split, w in writers.items():
                w.rollback(marks[split])
            for name in list(domain_table)[known_domains:]:
                del domain_table[name]
            skipped.append({"path": path, "reason": e.reason})
        progress.end_file()
    progress.send()
    return {"name": unit.name, "inputs": [p for p, _ in unit.files], "skipped": skipped,
            "domains": list(domain_table),
            "splits": {split: w.close() for split, w in writers.items()}, "files": {}}


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- the whole corpus


def _plan_document(units: Sequence[Unit], options: Options, identity: dict[str, Any],
                   dtype: str) -> dict[str, Any]:
    return {"format": shards.FORMAT, "version": shards.VERSION, "tokenizer": identity,
            "dtype": dtype, "options": {**dataclasses.asdict(options),
                                        "fields": options.fields._asdict()},
            "units": [{"name": u.name, "format": u.format, "files": [list(f) for f in u.files]}
                      for u in units]}


def _start_or_resume(output: Path, plan: dict[str, Any]) -> None:
    """Writes the plan, or checks a previous run's plan matches; removes stale temporaries."""
    plan_path = output / shards.PLAN
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text(encoding="utf-8"))
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise ValueError(f"--output {str(output)!r} holds a prepare_data.py run with other "
                             f"settings or inputs (differs in: {', '.join(changed)}); use a new "
                             f"--output or delete that directory")
    elif output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {str(output)!r} is not empty and not a prepare_data.py output")
    else:
        write_atomically(plan_path, _dumps(plan))
    for stale in output.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _manifest(plan: dict[str, Any], metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    domains = sorted({d for m in metas for d in m["domains"]})
    splits = {}
    for split in shards.SPLITS:
        parts = [m["splits"][split] for m in metas]
        splits[split] = {
            "documents": sum(p["documents"] for p in parts),
            "tokens": sum(p["tokens"] for p in parts), "bytes": sum(p["bytes"] for p in parts),
            "byte_counts": np.sum([p["byte_counts"] for p in parts], axis=0).tolist()}
    if splits["train"]["documents"] + splits["validation"]["documents"] == 0:
        raise ValueError("the inputs hold no documents: the corpus is empty")
    if splits["train"]["documents"] == 0:
        raise ValueError(f"no document falls into the train split (validation_fraction="
                         f"{plan['options']['validation_fraction']})")
    return {"format": shards.FORMAT, "version": shards.VERSION, "tokenizer": plan["tokenizer"],
            "dtype": plan["dtype"], "domains": domains,
            "validation_fraction": plan["options"]["validation_fraction"],
            "split_key": "sha1 of the document key (experiments.data.corpus.split_of)",
            "options": plan["options"], "splits": splits,
            "skipped_files": [s for m in metas for s in m["skipped"]],
            "shards": [{k: m[k] for k in ("name", "inputs", "domains", "files")}
                       | {"splits": {s: {k: v for k, v in m["splits"][s].items()
                                         if k != "byte_counts"} for s in shards.SPLITS}}
                       for m in metas]}


def prepare(patterns: Sequence[str], output: str | os.PathLike[str], options: Options = Options(),
            *, workers: int = 1, progress: bool = True,
            on_shard_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Prepares (or finishes preparing) the shards of `patterns` in `output`; the manifest.

    `on_shard_done` is called in this process after each shard is in place (tests).
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    paths.require_local(output, "prepare_data.py --output",
                        "shards are written into local temporary directories renamed into "
                        "place when complete (a bucket has no rename); prepare them locally, "
                        "then copy the directory into the bucket (docs/data.md)")
    corpus.split_of("", options.validation_fraction)  # Validates the fraction.
    identity = shards.tokenizer_identity(options.tokenizer)
    shards.check_eos(identity)
    dtype = shards.dtype_for(identity["vocab_size"], options.dtype)
    units = plan_units(inputs.expand_inputs(patterns), options.format, options.shard_bytes)
    output = Path(output)
    plan = json.loads(_dumps(_plan_document(units, options, identity, dtype)))
    _start_or_resume(output, plan)
    if (output / shards.MANIFEST).is_file():
        return shards.read_manifest(output)
    pending = [u for u in units if not (output / u.name / shards.SHARD_META).is_file()]
    tasks = [_Task(u, str(output), options, dtype) for u in pending]
    by_name = {u.name: u for u in units}
    bar = _Progress(sum(u.input_bytes for u in units), sum(u.input_bytes for u in pending),
                    enabled=progress)
    try:
        for meta in _run(tasks, workers, bar.report):
            bar.shard_done(meta["name"], by_name[meta["name"]].input_bytes,
                           sum(meta["splits"][s]["tokens"] for s in shards.SPLITS))
            if on_shard_done is not None:
                on_shard_done(meta)
    finally:
        bar.close()
    metas = [json.loads((output / u.name / shards.SHARD_META).read_text(encoding="utf-8"))
             for u in units]
    manifest = _manifest(plan, metas)
    write_atomically(output / shards.MANIFEST, _dumps(manifest))
    return manifest


def _run(tasks: Sequence[_Task], workers: int,
         report: Callable[[tuple[str, int, int]], None]) -> Iterator[dict[str, Any]]:
    """Writes the shards (inline for one worker), yielding each meta as it finishes;
    progress goes to `report` meanwhile."""
    global _progress_sink  # pylint: disable=global-statement
    if workers == 1 or len(tasks) <= 1:
        _progress_sink = report
        try:
            for task in tasks:
                yield write_shard(task)
        finally:
            _progress_sink = None
        return
    # spawn: no inherited locks or threads (grain, jax) in the workers.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with context.Pool(min(workers, len(tasks)), initializer=_init_worker,
                      initargs=(queue,)) as pool:
        results = pool.imap_unordered(write_shard, tasks)
        for _ in tasks:
            while True:
                try:
                    meta = results.next(timeout=_REPORT_EVERY_S)
                    break
                except multiprocessing.TimeoutError:
                    _drain(queue, report)
            _drain(queue, report)
            yield meta


def _drain(queue: Any, report: Callable[[tuple[str, int, int]], None]) -> None:
    while True:
        try:
            report(queue.get_nowait())
        except queue_lib.Empty:
            return


class _Progress:
    """tqdm over input bytes (MB/s and ETA) with tokens/s; a line per shard without tqdm."""

    def __init__(self, total_bytes: int, pending_bytes: int, *, enabled: bool):
        self._start = time.perf_counter()
        self._tokens = 0
        self._credited: dict[str, tuple[int, int]] = {}  # Shard -> (bytes, tokens) so far.
        self._done: set[str] = set()
        self._bar = None
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm  # pylint: disable=g-import-not-at-top
            except ImportError:
                return
            self._bar = tqdm(total=total_bytes, initial=total_bytes - pending_bytes, unit="B",
                             unit_scale=True, desc="prepare", file=sys.stderr)

    def report(self, message: tuple[str, int, int]) -> None:
        """A shard writer's progress; late messages of a finished shard are ignored."""
        name, input_bytes, tokens = message
        if name in self._done:
            return
        done_bytes, done_tokens = self._credited.get(name, (0, 0))
        self._credited[name] = (done_bytes + input_bytes, done_tokens + tokens)
        self._advance(input_bytes, tokens)

    def shard_done(self, name: str, input_bytes: int, tokens: int) -> None:
        done_bytes, done_tokens = self._credited.pop(name, (0, 0))
        self._done.add(name)
        self._advance(input_bytes - done_bytes, tokens - done_tokens)
        if self._bar is None and self._enabled:
            print(f"prepare: {name} done, {self._rate():,.0f} tokens/s", file=sys.stderr)

    def _rate(self) -> float:
        return self._tokens / max(time.perf_counter() - self._start, 1e-9)

    def _advance(self, input_bytes: int, tokens: int) -> None:
        self._tokens += tokens
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._rate():,.0f} tokens/s", refresh=False)
            self._bar.update(input_bytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def verify(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Checks every shard file's size and sha256 against the manifest; the manifest."""
    directory = paths.as_path(directory)
    manifest = shards.read_manifest(directory)
    for entry in manifest["shards"]:
        for name, expected in entry["files"].items():
            shards.verify_file(directory / entry["name"] / name, expected, checksum=True)
    return manifest
