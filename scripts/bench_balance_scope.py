"""Cost of the balance scopes in the training step: paired step-time ratios.

  python scripts/bench_balance_scope.py --rounds=20

Builds the model of gin_configs/experiments/balance_tiny.gin (or --gin_file)
and times one optimizer step for each configuration, interleaved round by
round, against `micro_batch` (counts from the micro-batch's own pass):
`global_batch` exact (an extra forward pass over every micro-batch first),
`global_batch` causal (Megatron's running buffer, no extra pass),
`sequence`, and `shuffled:N`. Reports the median over rounds of the paired
ratios (config time / micro_batch time of the same round).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np

from experiments.data.config import DataConfig
from experiments.runtime import cli, gin_utils
from experiments.train.config import model_vocab_size
from experiments.train.optim import learning_rate_schedule, make_optimizer
from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import build_model, split_model
from layers.transformer import TransformerLM

CONFIGS = (("micro_batch", "exact"), ("global_batch", "exact"), ("global_batch", "causal"),
           ("sequence", "exact"), ("shuffled:256", "exact"))


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gin_file", default="gin_configs/experiments/balance_tiny.gin")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--num_microbatches", type=int, default=4)
    args = parser.parse_args(argv)
    gin_utils.parse([args.gin_file], [])
    data = DataConfig()
    model = build_model(TransformerLM, model_vocab_size(data=data), seed=0)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(learning_rate_schedule(1000))
    opt_state = tx.init(params)
    batch = next(data.train_iterator(0))
    base = LossWeights()
    steps = {}
    for scope, mode in CONFIGS:
        weights = dataclasses.replace(base, lbl_scope=scope, lbl_global_mode=mode)
        # make_train_step returns a plain function; the caller jits it (once).
        step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=weights,
                                       num_microbatches=args.num_microbatches, num_domains=2))
        jax.block_until_ready(step(params, opt_state, batch, jax.random.PRNGKey(0)))  # compile
        steps[f"{scope}/{mode}"] = step
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params, opt_state, batch, jax.random.PRNGKey(r)))
            times[name].append(time.perf_counter() - start)
    reference = np.asarray(times["micro_batch/exact"])
    print(f"{args.rounds} interleaved rounds, {args.num_microbatches} micro-batches of "
          f"{data.batch_size // args.num_microbatches} x {data.seq_len} tokens, "
          f"{jax.device_count()} device(s) ({jax.devices()[0].platform})")
    print(f"{'config':<24} {'median ms':>10} {'median ratio vs micro_batch':>28}")
    for name, values in times.items():
        ratio = np.median(np.asarray(values) / reference)
        print(f"{name:<24} {1e3 * np.median(values):>10.1f} {ratio:>28.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
