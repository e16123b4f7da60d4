"""Corpus scaling of prepared token shards: prepare throughput, reader start-up, memory, speed.

  python scripts/bench_data.py --sizes_mb 100 2000 --json docs/bench_data.json

For each size a synthetic JSONL corpus (Zipf-distributed pseudo-words, three domains,
~2 KB documents, 32 MB files) is generated into a temporary directory (nothing is
stored in the repository; --keep keeps it) and prepared with the byte tokenizer, once
with one worker (MB/s per worker) and, with --workers N > 1, again with N. Then, each
in a fresh process: the reader's start-up (DataConfig(source='shards:...') -> train
iterator -> first batch, plus domains and the unigram entropy as a run asks for them),
the validation batches the trainer materialises (the validation fraction is set so the
split is about --validation_mb at every size), its batches/s over --batches batches and
its peak RSS. Last, the train step of a model
preset (--model_gin, default the small top-2 preset) on batches of the same shape, so
the reader's tokens/s can be set against what the step consumes on this machine.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from experiments.runtime import cli

_FILE_BYTES = 32 << 20
_VOCAB = 4096
_DOMAINS = ("code", "prose", "web")


def _words(rng: np.random.Generator) -> list[str]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(1, 10, _VOCAB)
    words = ["".join(rng.choice(letters, n)) + " " for n in lengths]
    words[:4] = [".\n", ", ", "\n\n", "(): "]  # Frequent punctuation and newlines.
    return words


def generate_corpus(directory: Path, size_mb: int, seed: int = 0) -> int:
    """Writes JSONL files of about `size_mb` MB in total; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = np.array(_words(rng), dtype=object)
    p = 1.0 / np.arange(1, _VOCAB + 1) ** 1.1
    p /= p.sum()
    mean_word = float(sum(len(w) * q for w, q in zip(words, p)))
    target, written, index = size_mb << 20, 0, 0
    directory.mkdir(parents=True, exist_ok=True)
    while written < target:
        budget = min(_FILE_BYTES, target - written)
        ids = rng.choice(_VOCAB, size=int(budget / (mean_word + 0.5)), p=p)
        tokens = words[ids].tolist()
        doc_words = rng.lognormal(np.log(300), 0.8, size=len(tokens) // 100 + 1).astype(int) + 1
        bounds = np.concatenate([[0], np.cumsum(doc_words)])
        bounds = bounds[bounds < len(tokens)].tolist() + [len(tokens)]
        lines = [json.dumps({"text": "".join(tokens[a:b]), "domain": _DOMAINS[i % 3]})
                 for i, (a, b) in enumerate(itertools.pairwise(bounds))]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        (directory / f"part-{index:05d}.jsonl").write_bytes(data)
        written += len(data)
        index += 1
    return written


def _prepare(corpus: Path, output: Path, workers: int, fraction: float, shard_mb: int) -> dict:
    from experiments.data import prepare  # pylint: disable=g-import-not-at-top

    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare.prepare([str(corpus / "*.jsonl")], output,
                               prepare.Options(validation_fraction=fraction,
                                               shard_bytes=shard_mb << 20), workers=workers,
                               progress=False)
    seconds = time.perf_counter() - start
    input_mb = sum(f.stat().st_size for f in corpus.glob("*.jsonl")) / 2**20
    tokens = sum(manifest["splits"][s]["tokens"] for s in ("train", "validation"))
    return {"workers": workers, "seconds": seconds, "input_mb": input_mb,
            "mb_per_s": input_mb / seconds, "mb_per_s_per_worker": input_mb / seconds / workers,
            "tokens_per_s": tokens / seconds, "tokens": tokens,
            "documents": sum(manifest["splits"][s]["documents"] for s in ("train", "validation")),
            "shards": len(manifest["shards"])}


def _memory_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS of this process in MB. Not `ru_maxrss`: Linux carries that
    over from the parent across fork and exec."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_benchmark(directory: str, fraction: float, batch_size: int, seq_len: int,
                   batches: int) -> dict:
    """Runs in a fresh process (--_read): start-up, throughput and peak RSS of the reader."""
    t0 = time.perf_counter()
    from experiments.data.config import DataConfig  # pylint: disable=g-import-not-at-top

    imported_rss = _memory_mb("VmRSS")
    t1 = time.perf_counter()
    config = DataConfig(source=f"shards:{directory}", seq_len=seq_len, batch_size=batch_size,
                        validation_fraction=fraction, eval_max_batches=16)
    iterator = config.train_iterator(0, process_index=0, process_count=1)
    first = next(iterator)
    config.domains()
    config.unigram_entropy("train")
    startup = time.perf_counter() - t1
    t_eval = time.perf_counter()
    config.eval_batches()  # What the trainer also builds at start-up.
    eval_s = time.perf_counter() - t_eval
    real_tokens = float(first["weights"].sum())
    t2 = time.perf_counter()
    for _ in range(batches):
        real_tokens += float(next(iterator)["weights"].sum())
    seconds = time.perf_counter() - t2
    return {"import_s": t1 - t0, "startup_s": startup, "eval_batches_s": eval_s,
            "batches_per_s": batches / seconds,
            "tokens_per_s": batches * batch_size * seq_len / seconds,
            "non_padding_fraction": real_tokens / ((batches + 1) * batch_size * seq_len),
            "rss_after_imports_mb": imported_rss,
            "peak_rss_mb": _memory_mb("VmHWM"),
            # Anonymous memory vs pages of the memory-mapped shards (reclaimable page cache).
            "rss_anon_mb": _memory_mb("RssAnon"), "rss_file_mb": _memory_mb("RssFile")}


def _fraction(size_mb: int, args) -> float:
    """The validation fraction giving a validation split of about --validation_mb."""
    return min(0.05, args.validation_mb / size_mb)


def _read_in_subprocess(directory: Path, size_mb: int, args) -> dict:
    command = [sys.executable, __file__, "--_read", str(directory),
               f"--_fraction={_fraction(size_mb, args)!r}",
               f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}",
               f"--batches={args.batches}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_benchmark(model_gin: str, batch_size: int, seq_len: int, steps: int) -> dict:
    """Median seconds of the train step of the `model_gin` preset at [batch_size, seq_len]."""
    # pylint: disable=g-import-not-at-top
    import gin
    import jax
    import optax
    from flax import nnx

    from experiments.train.run_state import split_model
    from experiments.train.train_step import LossWeights, make_train_step
    from layers.transformer import TransformerLM

    gin.parse_config_files_and_bindings([model_gin], [])
    model = nnx.jit(lambda: TransformerLM(vocab_size=259, rngs=nnx.Rngs(params=0)))()
    graphdef, params, rest = split_model(model)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=LossWeights(),
                                   num_microbatches=1, num_domains=3))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (batch_size, seq_len + 1)).astype(np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": ones * 1.0,
             "segment_ids": ones, "positions": np.cumsum(ones, 1) - 1, "domain": ones * 0}
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    jax.block_until_ready(step(params, opt_state, batch, key))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step(params, opt_state, batch, key))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"model_gin": model_gin, "batch": [batch_size, seq_len], "compile_s": compile_s,
            "median_step_s": median, "tokens_per_s": batch_size * seq_len / median,
            "device": jax.devices()[0].device_kind}


def _parse(argv: list[str] | None):
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--workers", type=int, default=1,
                        help="Also prepare with this many workers (1: only the one-worker run).")
    parser.add_argument("--shard_mb", type=int, default=32,
                        help="prepare_data.py --shard_bytes, in MB (small: several shards at "
                             "100 MB, so workers have work to share).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--model_gin", default="gin_configs/models/top2_small.gin")
    parser.add_argument("--steps", type=int, default=3, help="Timed train steps (0: skip).")
    parser.add_argument("--workdir", default=None, help="Where the corpora go (default: a "
                        "temporary directory, deleted at the end unless --keep).")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--validation_mb", type=float, default=1.0,
                        help="Validation split size: the trainer materialises it at start-up.")
    parser.add_argument("--_read", default=None, help=argparse_hidden())
    parser.add_argument("--_fraction", type=float, default=0.05, help=argparse_hidden())
    return parser.parse_args(argv)


def argparse_hidden() -> str:
    import argparse  # pylint: disable=g-import-not-at-top

    return argparse.SUPPRESS


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args._read:  # pylint: disable=protected-access
        print(json.dumps(read_benchmark(args._read, args._fraction, args.batch_size,  # pylint: disable=protected-access
                                        args.seq_len, args.batches)))
        return 0
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    report = {"batch": [args.batch_size, args.seq_len], "tokenizer": "byte", "sizes": {}}
    try:
        for size in args.sizes_mb:
            corpus, shards_dir = root / f"corpus_{size}mb", root / f"shards_{size}mb"
            start = time.perf_counter()
            if not (corpus / "done").is_file():  # Reused from an earlier --keep run.
                shutil.rmtree(corpus, ignore_errors=True)
                generate_corpus(corpus, size)
                (corpus / "done").touch()
            entry = {"generate_s": time.perf_counter() - start,
                     "validation_fraction": _fraction(size, args),
                     "shard_mb": args.shard_mb,
                     "prepare": [_prepare(corpus, shards_dir, 1, _fraction(size, args),
                                          args.shard_mb)]}
            if args.workers > 1:
                entry["prepare"].append(_prepare(corpus, shards_dir, args.workers,
                                                 _fraction(size, args), args.shard_mb))
            entry["shards_mb"] = sum(f.stat().st_size for f in shards_dir.rglob("*")
                                     if f.is_file()) / 2**20
            entry["read"] = _read_in_subprocess(shards_dir, size, args)
            report["sizes"][str(size)] = entry
            print(json.dumps({size: entry}), flush=True)
            if not args.keep:
                shutil.rmtree(corpus)
        if args.steps:
            report["step"] = step_benchmark(args.model_gin, args.batch_size, args.seq_len,
                                            args.steps)
            print(json.dumps({"step": report["step"]}), flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
