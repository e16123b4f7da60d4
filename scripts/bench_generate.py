"""Times KV-cache generation: prefill and per-token decode, MoE vs its dense twin.

  python scripts/bench_generate.py [--presets=tiny,small] [--rounds=5] \\
      [--json=PATH] [--markdown=PATH] [--small]
  python scripts/bench_generate.py --workdir=W   # a trained or imported model

For each preset (`tiny` = gin_configs/models/top2_tiny.gin, `small` =
gin_configs/models/top2_small.gin: top-2 of 8 experts every other layer), the
MoE model and the dense model of equal active parameters
(`TransformerLM.dense_baseline = True`) are built with random weights (or the
MoE restored from --workdir, its dense twin built from the same config) and run
through `experiments.inference.generate.Generator`, greedy, EOS disabled,
for --new_tokens tokens, in cells (batch, context). `context` is the KV cache's
length bucket L (a power of two): the engine attends over all L slots at every
step (masked), so L is the context a decode step pays for. The prompt has L/2
tokens, the longest whose buckets (`generate.buckets`: prompt bucket P = L/2,
cache L = next power of two >= P + new tokens) give that L.

Every cell is compiled and run once before timing (warm-up excluded); then
each round runs every (model, cell) once, in an order that alternates between
rounds, and each figure is the median over rounds; ratios are medians of the
per-round ratios, so slow drift of a shared machine cancels to first order.
Figures: prefill tokens/s (prompt tokens over the median prefill time), decode ms per
step and tokens/s (batch / step time), and the decode step's context ratio
(context 2048 over 128, batch 1) next to what a FLOP count predicts with a
cache (attention grows with context, the rest does not) and without one (each
step recomputes the context). The load average (`os.getloadavg`) is recorded
before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gin
import jax
import numpy as np

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib
from experiments.inference.sampling import SamplingConfig
from experiments.runtime import cli, gin_utils
from experiments.train import trainer  # noqa: F401  (registers the configurables)
from experiments.train.run_state import build_model, split_model
from layers.transformer import TransformerLM
from moe.router_state import RouterState

PRESETS = {"tiny": "gin_configs/models/top2_tiny.gin",
           "small": "gin_configs/models/top2_small.gin"}
# --small: the tiny preset shrunk further, short contexts: a seconds-long smoke run.
SMALL_BINDINGS = ("TransformerLM.d_model = 32", "TransformerLM.num_layers = 2",
                  "TransformerLM.num_heads = 2", "TransformerLM.d_ff = 64",
                  "MoeLayer.num_experts = 4", "MoeLayer.d_ff = 32")
VARIANTS = ("moe", "dense")


@dataclasses.dataclass(frozen=True)
class Cell:
    batch: int
    context: int

    @property
    def name(self) -> str:
        return f"b{self.batch}_ctx{self.context}"


@dataclasses.dataclass
class Subject:
    """One model under test: its generator and the shape facts of its FLOP model."""

    preset: str
    variant: str
    generator: Any
    total_params: int
    active_params: int
    matmul_params: int  # active parameters a decode step multiplies (embedding lookup excluded)
    num_layers: int
    attention_width: int  # num_heads * head_dim
    kv_bytes_per_slot: int  # keys and values of one cache slot, all layers


def _model_facts(model: TransformerLM) -> dict[str, int]:
    """Sizes of the FLOP model. Any attention kind: the cache bytes per slot come from the
    model's own cache layout (`init_cache`: keys and values, or MLA's latent and RoPE key),
    the attention width from the layer's `attention_flops` when it has one (MLA: the
    training form, H (dn + dr + dv) / 2, against num_heads * head_dim)."""
    first = model.block(model.layer_names[0]).attention
    active = model.active_param_count()
    lookup = 0 if model.tie_embeddings else model.vocab_size * model.d_model
    slot = jax.eval_shape(lambda: model.init_cache(1, 1))
    if hasattr(first, "attention_flops"):
        width = int(first.attention_flops(1) // 4)
    else:
        width = first.num_heads * first.head_dim
    return dict(total_params=model.param_count(), active_params=active,
                matmul_params=active - lookup, num_layers=model.num_layers,
                attention_width=width,
                kv_bytes_per_slot=sum(leaf.size * leaf.dtype.itemsize
                                      for leaf in jax.tree.leaves(slot)))


def _random_subject(preset: str, variant: str, gin_files: list[str], bindings: list[str],
                    vocab_size: int) -> Subject:
    """A random-init model of the given gin config (dense twin with dense_baseline)."""
    gin.clear_config()
    extra = ["TransformerLM.dense_baseline = True"] if variant == "dense" else []
    gin_utils.parse(gin_files, [*bindings, *extra])
    model = build_model(TransformerLM, vocab_size, seed=0)
    gin.clear_config()
    restore_lib.make_dropless(model)
    graphdef, params, rest = split_model(model)
    restored = restore_lib.RestoredModel(
        workdir=Path("."), step=0, vocab_size=vocab_size, graphdef=graphdef, params=params,
        rest=rest, router_state=RouterState())
    return Subject(preset, variant, generate_lib.Generator(restored), **_model_facts(model))


def _workdir_subjects(workdir: str, step: int | None) -> list[Subject]:
    restored = restore_lib.restore_model(workdir, step)
    model = restored.model()
    moe = Subject("workdir", "moe", generate_lib.Generator(restored), **_model_facts(model))
    config = str(Path(workdir) / gin_utils.CONFIG_FILE)
    dense = _random_subject("workdir", "dense", [config], [], restored.vocab_size)
    return [moe, dense]


def _timed_generate(generator: Any, prompts: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """One greedy generation; {prefill_s, decode_s, decode_steps, buckets} from the
    engine's stats (compilation excluded)."""
    start = time.perf_counter()
    out = generator.generate(prompts.tolist(), max_new_tokens=new_tokens,
                             sampling=SamplingConfig(), seed=0, eos_ids=())
    wall = time.perf_counter() - start
    if any(len(row) != new_tokens for row in out):
        raise RuntimeError(f"expected {new_tokens} new tokens per row, got "
                           f"{sorted({len(row) for row in out})}")
    stats = generator.last_stats
    return dict(prefill_s=float(stats.prefill_seconds), decode_s=float(stats.decode_seconds),
                decode_steps=int(stats.decode_steps), wall_s=wall,
                buckets=[stats.batch_bucket, stats.prompt_bucket, stats.length_bucket])


def prompt_length(cell: Cell, new_tokens: int) -> int:
    """context / 2, checked against the engine's buckets (cache bucket == context)."""
    length = cell.context // 2
    got = generate_lib.buckets(cell.batch, length, new_tokens)
    if got[2] != cell.context or got[0] != cell.batch:
        raise ValueError(f"--cells: {cell.batch}x{cell.context} with --new_tokens={new_tokens} "
                         f"gives the engine's buckets (batch, prompt, cache) = {got}; use "
                         f"powers of two with context >= max(16, 2 * new_tokens)")
    return length


def _prompts(cell: Cell, new_tokens: int, vocab_size: int) -> np.ndarray:
    """`[batch, prompt_length] int32` random ids (specials excluded)."""
    rng = np.random.default_rng(cell.batch * 100_003 + cell.context)
    low = min(3, vocab_size - 1)
    return rng.integers(low, vocab_size, (cell.batch, prompt_length(cell, new_tokens)), np.int32)


def measure(subjects: list[Subject], cells: list[Cell], new_tokens: int,
            rounds: int) -> dict[tuple[str, str], list[dict[str, float]]]:
    """{(variant, cell name): per-round timings} of one preset, warm-up excluded,
    (variant, cell) pairs run in alternating order from round to round."""
    pairs = [(s, c) for c in cells for s in subjects]
    prompts: dict[tuple[str, str], np.ndarray] = {}
    for subject, cell in pairs:
        prompts[(subject.variant, cell.name)] = _prompts(cell, new_tokens, _vocab(subject))
        _timed_generate(subject.generator, prompts[(subject.variant, cell.name)], new_tokens)
    timings: dict[tuple[str, str], list[dict[str, float]]] = {
        (s.variant, c.name): [] for s, c in pairs}
    for r in range(rounds):
        for subject, cell in (pairs if r % 2 == 0 else pairs[::-1]):
            key = (subject.variant, cell.name)
            timings[key].append(_timed_generate(subject.generator, prompts[key], new_tokens))
    return timings


def _vocab(subject: Subject) -> int:
    return int(subject.generator.restored.vocab_size)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _cell_figures(runs: list[dict[str, float]], cell: Cell, new_tokens: int) -> dict[str, Any]:
    prompt = prompt_length(cell, new_tokens)
    step_s = [r["decode_s"] / r["decode_steps"] for r in runs]
    prefill_s = _median([r["prefill_s"] for r in runs])
    return dict(batch=cell.batch, context=cell.context, prompt_tokens=prompt,
                new_tokens=new_tokens, decode_steps=runs[0]["decode_steps"],
                engine_buckets=runs[0]["buckets"],
                prefill_ms=1e3 * prefill_s,
                prefill_tokens_per_s=cell.batch * prompt / prefill_s,
                decode_ms_per_step=1e3 * _median(step_s),
                decode_tokens_per_s=cell.batch / _median(step_s),
                decode_ms_per_step_min=1e3 * min(step_s), decode_ms_per_step_max=1e3 * max(step_s))


def _value(run: dict[str, float], field: str) -> float:
    return run["decode_s"] / run["decode_steps"] if field == "decode" else run["prefill_s"]


def _paired(a: list[dict[str, float]], b: list[dict[str, float]], field: str) -> float:
    """Median over rounds of a[field] / b[field] (per step for decode)."""
    return _median([_value(x, field) / _value(y, field) for x, y in zip(a, b)])


def _paired_difference_ms(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """Median over rounds of the decode step time of a minus b, in ms."""
    return 1e3 * _median([_value(x, "decode") - _value(y, "decode") for x, y in zip(a, b)])


def flop_ratios(subject: Subject, short: int, long: int) -> dict[str, float]:
    """Decode-step FLOP ratio context `long` / `short` (batch 1) with a cache
    (2 * matmul params per token, plus 4 * context * attention width per layer
    for QK^T and AV over the cache slots) and without (the step recomputes the
    whole context: context tokens' matmuls plus causal attention among them)."""
    fixed = 2 * subject.matmul_params
    attention = 4 * subject.num_layers * subject.attention_width

    def cached(context: int) -> float:
        return fixed + attention * context

    def recomputed(context: int) -> float:
        return context * fixed + attention * context * (context + 1) / 2

    return dict(with_cache=cached(long) / cached(short),
                without_cache=recomputed(long) / recomputed(short),
                attention_share_long=attention * long / cached(long),
                attention_share_short=attention * short / cached(short))


def summarize(subjects: list[Subject], cells: list[Cell], new_tokens: int,
              timings: dict[tuple[str, str], list[dict[str, float]]]) -> dict[str, Any]:
    """The figures of one preset: per model and cell, the context ratio, MoE/dense ratios."""
    out: dict[str, Any] = {"models": {}, "moe_over_dense": {}, "context_ratio": {}}
    for subject in subjects:
        out["models"][subject.variant] = dict(
            total_params=subject.total_params, active_params=subject.active_params,
            matmul_params=subject.matmul_params, num_layers=subject.num_layers,
            attention_width=subject.attention_width, kv_bytes_per_slot=subject.kv_bytes_per_slot,
            cells={c.name: _cell_figures(timings[(subject.variant, c.name)], c, new_tokens)
                   for c in cells})
        ones = sorted((c for c in cells if c.batch == 1), key=lambda c: c.context)
        if len(ones) >= 2:
            short, long = ones[0], ones[-1]
            runs_long = timings[(subject.variant, long.name)]
            runs_short = timings[(subject.variant, short.name)]
            out["context_ratio"][subject.variant] = dict(
                short=short.context, long=long.context,
                measured=_paired(runs_long, runs_short, "decode"),
                growth_ms=_paired_difference_ms(runs_long, runs_short),
                kv_cache_mb=dict(short=subject.kv_bytes_per_slot * short.context / 2**20,
                                 long=subject.kv_bytes_per_slot * long.context / 2**20),
                flops=flop_ratios(subject, short.context, long.context))
    variants = {s.variant for s in subjects}
    if {"moe", "dense"} <= variants:
        for c in cells:
            moe, dense = timings[("moe", c.name)], timings[("dense", c.name)]
            out["moe_over_dense"][c.name] = dict(prefill=_paired(moe, dense, "prefill"),
                                                 decode=_paired(moe, dense, "decode"))
    return out


def markdown(result: dict[str, Any]) -> str:
    """The tables pasted into docs/benchmarks.md ("Generation")."""
    lines = ["| preset | model | active params | cell | prefill tok/s | decode ms/step "
             "| decode tok/s |", "|---|---|---|---|---|---|---|"]
    ratios = ["| preset | model | decode step ctx long/short | step time growth "
              "| KV cache read per step (short, long) | FLOP model, with cache "
              "| FLOP model, without cache | attention share of the step FLOPs (short, long) |",
              "|---|---|---|---|---|---|---|---|"]
    versus = ["| preset | cell | MoE/dense prefill | MoE/dense decode |", "|---|---|---|---|"]
    for preset, figures in result["presets"].items():
        for variant, model in figures["models"].items():
            for cell in model["cells"].values():
                lines.append(
                    f"| {preset} | {variant} | {model['active_params'] / 1e6:.2f} M "
                    f"| batch {cell['batch']}, context {cell['context']} "
                    f"| {cell['prefill_tokens_per_s']:,.0f} | {cell['decode_ms_per_step']:.2f} "
                    f"| {cell['decode_tokens_per_s']:,.0f} |")
        for variant, ratio in figures["context_ratio"].items():
            flops = ratio["flops"]
            ratios.append(
                f"| {preset} | {variant} | {ratio['measured']:.2f}x "
                f"({ratio['long']}/{ratio['short']}) | {ratio['growth_ms']:+.2f} ms "
                f"| {ratio['kv_cache_mb']['short']:.2g} MB, {ratio['kv_cache_mb']['long']:.3g} MB "
                f"| {flops['with_cache']:.2f}x "
                f"| {flops['without_cache']:.3g}x | {flops['attention_share_short']:.0%}, "
                f"{flops['attention_share_long']:.0%} |")
        for name, ratio in figures["moe_over_dense"].items():
            versus.append(f"| {preset} | {name} | {ratio['prefill']:.2f}x "
                          f"| {ratio['decode']:.2f}x |")
    return "\n".join([*lines, "", *ratios, "", *versus]) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                     prefix=f".{path.name}.") as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def _cells(text: str) -> list[Cell]:
    """'1x128,1x2048,16x128' -> cells (batch x context)."""
    cells = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            batch, context = (int(v) for v in part.split("x"))
        except ValueError:
            raise ValueError(f"--cells: {part!r} is not BATCHxCONTEXT, e.g. 16x128") from None
        if batch < 1 or context < 2:
            raise ValueError(f"--cells: {part!r} needs batch >= 1 and context >= 2")
        cells.append(Cell(batch, context))
    if not cells:
        raise ValueError(f"--cells: no cell in {text!r}")
    return cells


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--presets", default="tiny,small",
                        help=f"comma-separated, of {sorted(PRESETS)}")
    parser.add_argument("--workdir", help="time this workdir's model instead of the presets")
    parser.add_argument("--step", type=int, default=None, help="with --workdir: the checkpoint")
    parser.add_argument("--cells", default="1x128,1x2048,16x128",
                        help="BATCHxCONTEXT cells; the batch-1 cells give the context ratio")
    parser.add_argument("--new_tokens", type=int, default=16, help="decode steps per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab_size", type=int, default=259,
                        help="vocabulary of the random models (259 = the byte tokenizer)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra binding for the preset models (repeatable)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the markdown tables here")
    parser.add_argument("--small", action="store_true",
                        help="smoke run: tiny preset shrunk, cells 1x16,1x64,4x16, 4 tokens, "
                             "2 rounds")
    return parser


def _check(args: argparse.Namespace) -> list[Cell]:
    if args.small:
        args.presets, args.cells, args.new_tokens, args.rounds = "tiny", "1x16,1x64,4x16", 4, 2
        args.gin_param = [*SMALL_BINDINGS, *args.gin_param]
    for name in filter(None, args.presets.split(",")):
        if name not in PRESETS:
            raise ValueError(f"--presets: {name!r} is not one of {sorted(PRESETS)}")
    for flag in ("new_tokens", "rounds", "vocab_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    cells = _cells(args.cells)
    for cell in cells:
        prompt_length(cell, args.new_tokens)
    return cells


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cells = _check(args)
    load_before = os.getloadavg()
    result: dict[str, Any] = dict(
        command="python scripts/bench_generate.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        device=jax.devices()[0].device_kind, platform=jax.default_backend(),
        machine=platform.machine(), cpu_count=os.cpu_count(), jax=jax.__version__,
        load_average_before=list(load_before), new_tokens=args.new_tokens, rounds=args.rounds,
        vocab_size=args.vocab_size, gin_params=args.gin_param,
        cells=[dataclasses.asdict(c) for c in cells], presets={})
    if args.workdir:
        groups = {"workdir": _workdir_subjects(args.workdir, args.step)}
    else:
        groups = {name: [_random_subject(name, v, [PRESETS[name]], args.gin_param,
                                         args.vocab_size) for v in VARIANTS]
                  for name in filter(None, args.presets.split(","))}
    print(f"device={result['device']} cpus={result['cpu_count']} load={load_before[0]:.2f} "
          f"cells={args.cells} new_tokens={args.new_tokens} rounds={args.rounds}", flush=True)
    for name, subjects in groups.items():
        timings = measure(subjects, cells, args.new_tokens, args.rounds)
        result["presets"][name] = dict(
            gin_file=PRESETS.get(name, args.workdir), **summarize(subjects, cells,
                                                                  args.new_tokens, timings),
            rounds={f"{variant}/{cell}": runs for (variant, cell), runs in timings.items()})
        print(f"{name}: done (load {os.getloadavg()[0]:.2f})", flush=True)
    result["load_average_after"] = list(os.getloadavg())
    table = markdown(result)
    print(table)
    if args.json:
        _write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    if args.markdown:
        _write_atomic(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
