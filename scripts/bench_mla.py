"""Multi-head latent attention vs standard attention of equal heads: cache size and decode time.

  python scripts/bench_mla.py [--rounds=5] [--batch=4] [--prompt=448] [--new_tokens=64] \\
      [--json=PATH]

Three random-init dense decoders (`TransformerLM`, float32, same d_model, layers,
heads, FFN and vocabulary) differ only in their attention:
  standard  `Attention`: H heads of width h, cache 2 H h numbers per token per layer;
  mla       `MLAttention` (absorbed decode): kv_lora_rank r = 4 h, qk_nope_head_dim h,
            qk_rope_head_dim h / 2, v_head_dim h (DeepSeek-V3's ratios), cache r + h/2;
  mla_naive the same MLA with `absorb=False` (per-head keys/values rebuilt from the
            latent cache at every step: the reference path).
Each is run through the unchanged engine (`experiments.inference.generate.Generator`,
greedy, no EOS) on the same random prompts; the figure is the median over rounds of the
engine's seconds per decode step (compilation and warm-up excluded; the order of the
models alternates between rounds), and the median of the per-round ratios to standard
attention (slow drift of a shared machine cancels to first order). Cache bytes per
token come from `init_cache` itself.
The load average (`os.getloadavg`) is printed before and after: on a shared machine
the times are indicative only.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib
from experiments.runtime import cli
from layers import MLAttention, TransformerLM
from moe.router_state import RouterState

D_MODEL, LAYERS, HEADS, HEAD_DIM, D_FF, VOCAB = 256, 4, 8, 32, 512, 256


def _model(kind: str) -> TransformerLM:
    attention: Any = None
    if kind != "standard":
        attention = functools.partial(
            MLAttention, kv_lora_rank=4 * HEAD_DIM, qk_nope_head_dim=HEAD_DIM,
            qk_rope_head_dim=HEAD_DIM // 2, v_head_dim=HEAD_DIM, absorb=kind == "mla")
    extra = {} if attention is None else {"attention": attention}
    return TransformerLM(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS,
                         d_ff=D_FF, moe_every=0, dtype="float32", rngs=nnx.Rngs(0), **extra)


def _generator(model: TransformerLM) -> generate_lib.Generator:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return generate_lib.Generator(restore_lib.RestoredModel(
        workdir=Path("."), step=0, vocab_size=VOCAB, graphdef=graphdef,
        params=params.to_pure_dict(), rest=rest, router_state=RouterState()))


def cache_bytes_per_token(model: TransformerLM) -> int:
    """Bytes one token occupies in the cache of one layer (`init_cache`, compute dtype)."""
    cache = model.init_cache(1, 16)[model.layer_names[0]]
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)) // 16


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=448, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("rounds", "batch", "prompt", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    load_before = os.getloadavg()
    kinds = ("standard", "mla", "mla_naive")
    models = {kind: _model(kind) for kind in kinds}
    generators = {kind: _generator(models[kind]) for kind in kinds}
    prompts = np.random.default_rng(0).integers(0, VOCAB, (args.batch, args.prompt)).tolist()
    run = lambda kind: generators[kind].generate(prompts, max_new_tokens=args.new_tokens)
    for kind in kinds:  # compile and warm up
        run(kind)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            run(kind)
            times[kind].append(generators[kind].last_stats.seconds_per_decode_step)
    ratios = {kind: statistics.median(t / s for t, s in zip(times[kind], times["standard"]))
              for kind in kinds}
    stats = generators["standard"].last_stats
    result = {
        "shape": dict(d_model=D_MODEL, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM,
                      kv_lora_rank=4 * HEAD_DIM, qk_rope_head_dim=HEAD_DIM // 2,
                      batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                      length_bucket=stats.length_bucket, dtype="float32"),
        "backend": jax.default_backend(), "rounds": args.rounds,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "models": {kind: {"cache_bytes_per_token_per_layer": cache_bytes_per_token(models[kind]),
                          "params": models[kind].param_count(),
                          "decode_ms_per_step": 1e3 * statistics.median(times[kind]),
                          "decode_time_vs_standard": ratios[kind]}
                   for kind in kinds},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, args.json)  # atomic
    return 0


if __name__ == "__main__":
    sys.exit(main())
