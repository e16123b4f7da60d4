"""Routes a batch through an MoeLayer and prints routing statistics.

    python scripts/demo_routing.py [--num_experts 8 --k 2 --capacity_factor 1.25 --score sigmoid ...]

A quick look at what the layer does: per-expert load before and after
dropping, the dropped fraction at several capacity factors, the auxiliary
losses, and the agreement of the dispatch implementations.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.runtime import cli
from layers import MoeLayer
from layers.routers import TopKRouter
from moe.dispatch import expert_parallel as ep_lib
from moe.dispatch import runnable_dispatches
from moe.dispatch.registry import dispatch_traits


def _bar(fraction: float, width: int = 30) -> str:
    return "#" * round(fraction * width)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--d_ff", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--score", choices=("softmax", "sigmoid"), default="softmax",
                        help="router score function (TopKRouter.score)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The router is a module passed to the layer; its options are its own arguments
    # (in gin: MoeLayer.router = @TopKRouter, TopKRouter.score = 'sigmoid').
    router = functools.partial(TopKRouter, score=args.score)

    x = jax.random.normal(jax.random.key(args.seed), (args.batch, args.seq, args.d_model))
    # Skew the inputs so the router has something to prefer.
    x = x + 2.0 * jax.random.normal(jax.random.key(args.seed + 1), (1, 1, args.d_model))
    num_tokens = args.batch * args.seq
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {num_tokens} tokens, "
          f"E={args.num_experts}, k={args.k}, d_model={args.d_model}, d_ff={args.d_ff}, "
          f"{args.score} router")

    layer = MoeLayer(args.d_model, args.d_ff, args.num_experts, args.k,
                     router=router, capacity_factor=args.capacity_factor,
                     rngs=nnx.Rngs(args.seed))
    _, aux = layer(x)
    capacity = layer.capacity(num_tokens, deterministic=True)
    print(f"\ncapacity factor {args.capacity_factor}: C = {capacity} slots per expert")
    print(f"{'expert':>6} {'assigned':>9} {'kept':>6}  load (before dropping)")
    total = float(jnp.sum(aux.counts))
    for e in range(args.num_experts):
        assigned, kept = float(aux.counts[e]), float(aux.kept_counts[e])
        bar = _bar(assigned / total * args.num_experts / 2)
        print(f"{e:>6} {assigned:>9.0f} {kept:>6.0f}  {bar}")
    for key in ("lbl", "z_loss", "dropped_fraction", "max_violation", "router_entropy",
                "active_experts"):
        print(f"  {key:<17} {float(getattr(aux, key)):.4f}")

    print("\ndropped fraction by capacity factor:")
    for cf in (0.5, 1.0, 1.25, 2.0, None):
        layer_cf = MoeLayer(args.d_model, args.d_ff, args.num_experts, args.k,
                            router=router, capacity_factor=cf, rngs=nnx.Rngs(args.seed))
        _, aux_cf = layer_cf(x)
        label = "dropless" if cf is None else f"cf={cf}"
        print(f"  {label:<9} {float(aux_cf.dropped_fraction):.3f}")

    # Every dispatch with capacity_factor=None, its measured dropped fraction and what its
    # traits promise; a dispatch that can bound its buffers is also run with the opt-in.
    print("\ndispatch implementations, capacity_factor=None: max |y - y_einsum|, dropped:")
    outputs = {}
    for name in runnable_dispatches():
        layer_d = MoeLayer(args.d_model, args.d_ff, args.num_experts, args.k, router=router,
                           dispatch=name, rngs=nnx.Rngs(args.seed))
        outputs[name] = layer_d(x)
        option = dispatch_traits(name).bounded_option
        if option == "Sharding.ep_buffer_factor":
            with ep_lib.use_options(ep_lib.ExpertParallelOptions(buffer_factor=2.0)):
                outputs[f"{name} ({option}=2.0)"] = layer_d(x)
    for label, (y, aux_d) in outputs.items():
        name = label.split(" ")[0]
        exact = dispatch_traits(name).exact_dropless and label == name
        kind = "exact dropless" if exact else "bounded buffers: may drop"
        print(f"  {label:<48} {float(jnp.max(jnp.abs(y - outputs['einsum'][0]))):.2e}"
              f"   dropped {float(aux_d.dropped_fraction):.3f}   {kind}")

if __name__ == "__main__":
    sys.exit(main())
