"""Step-time ratios of one train step on several meshes of 8 simulated CPU devices.

  python scripts/bench_sharding.py [--rounds 10] [--json out.json]

Every mesh runs the same model and batch; each round times one step on every
mesh in turn (interleaved), and the reported figure is the median over rounds
of the step time divided by the `{data: 8}` step time of the same round. On
CPU this is not a performance claim (the "devices" share two cores); it checks
that nothing degenerates: the compiled step's collectives are counted, and any
all-gather that rebuilds a whole expert weight (all E experts) is flagged.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np
import optax
from flax import nnx

from experiments.runtime import cli
from experiments.runtime import mesh as mesh_lib
from experiments.train.run_state import split_model
from experiments.train.train_step import LossWeights, make_train_step
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.transformer import TransformerLM

MESHES = {
    "data8": {"data": 8},
    "data2_expert4": {"data": 2, "expert": 4},
    "data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
    "data2_expert4_no_ep": {"data": 2, "expert": 4},  # expert-sharded, XLA decides
}
NUM_EXPERTS, D_MODEL, EXPERT_D_FF = 8, 64, 128


def make_model() -> TransformerLM:
    moe_block = functools.partial(MoeLayer, num_experts=NUM_EXPERTS, k=2, d_ff=EXPERT_D_FF)
    return nnx.jit(lambda: TransformerLM(
        vocab_size=256, d_model=D_MODEL, num_layers=2, num_heads=4, d_ff=256, moe_every=2,
        moe_block=moe_block, dtype="float32", rngs=nnx.Rngs(params=0)))()


def make_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (batch_size, seq_len + 1)).astype(np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": ones.astype(np.float32), "segment_ids": ones,
            "positions": np.cumsum(ones, axis=1) - 1, "domain": np.zeros_like(ones)}


def collectives(hlo: str) -> dict[str, int]:
    counts = {op: len(re.findall(rf" {op}(?:-start)?\(", hlo))
              for op in ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                         "collective-permute")}
    # An all-gather producing [E, d, f] or [E, f, d]: every expert's weights on one device.
    full = rf"f32\[{NUM_EXPERTS},({D_MODEL},{EXPERT_D_FF}|{EXPERT_D_FF},{D_MODEL})\]"
    counts["expert_weight_all_gathers"] = sum(
        1 for line in hlo.splitlines()
        if re.search(r" all-gather(-start)?\(", line) and re.search(full, line.split("=")[1]
                                                                     .split("all-gather")[0]))
    return counts


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    batch = make_batch(args.batch_size, args.seq_len)
    tx = optax.adamw(1e-3)
    runs = {}
    for name, shape in MESHES.items():
        sharder = mesh_lib.Sharding(shape, expert_parallel=not name.endswith("no_ep"),
                                    ep_buffer_factor=2.0)
        # The sharding config chooses the dispatch (expert parallel or not) on the
        # model before it is split, as the trainer does; same seed, same weights.
        model = make_model()
        print(f"{name}: {sharder.configure_dispatch(model, tokens_per_call=batch['inputs'].size)}")
        graphdef, params, rest = split_model(model)
        placed = sharder.place_params(params, logical_axes_of(model))
        opt_state = sharder.init_opt_state(tx, placed)
        step = sharder.wrap_train_step(make_train_step(
            graphdef, rest, tx, loss_weights=LossWeights(), num_microbatches=1, num_domains=1,
            data_parallel_size=sharder.batch_shards))
        key = jax.random.PRNGKey(0)
        hlo = step.lower(placed, opt_state, batch, key).compile().as_text()
        out = step(placed, opt_state, batch, key)  # compile + warm up
        jax.block_until_ready(out)
        runs[name] = (step, placed, opt_state, key, collectives(hlo), float(out[2]["loss"]))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (step, placed, opt_state, key, _, _) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(step(placed, opt_state, batch, key))
            times[name].append(time.perf_counter() - start)
    base = times["data8"]
    report = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
              "batch": [args.batch_size, args.seq_len], "rounds": args.rounds, "meshes": {}}
    for name, (_, _, _, _, counts, loss) in runs.items():
        ratios = [t / b for t, b in zip(times[name], base)]
        report["meshes"][name] = {
            "mesh": MESHES[name], "expert_parallel": not name.endswith("no_ep"),
            "median_step_s": statistics.median(times[name]),
            "ratio_to_data8": statistics.median(ratios), "loss": loss, "collectives": counts}
    print(f"{'mesh':24s} {'step ms':>8s} {'ratio':>6s} {'loss':>8s}  collectives")
    for name, r in report["meshes"].items():
        print(f"{name:24s} {1e3 * r['median_step_s']:8.1f} {r['ratio_to_data8']:6.2f} "
              f"{r['loss']:8.4f}  {r['collectives']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
