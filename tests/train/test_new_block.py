"""A new block is one file: a toy block defined here, in the test module, reaches the
model, the train step, its metrics and the FLOP counter through the block interface
(`TransformerLM.block`, `skip_modules`, the `MoeAux` skip fields), with no library edit.

The toy block runs its dense FFN only on tokens at even positions (a fixed, hand-checkable
"skip router"): odd positions pass through the residual. With a [2, 6] batch of real tokens,
6 of 12 positions skip the FFN of every layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.train.flops import flop_counter
from experiments.train.run_state import split_model
from experiments.train.train_step import LossWeights, make_train_step
from layers.transformer import TransformerBlock, TransformerLM
from moe.layer_aux import MoeAux
from tests.helpers import packed_batch


class EvenPositionFfnBlock(TransformerBlock):
    """x + attn(norm(x)), then the FFN only where the position is even."""

    skip_modules = ("ffn",)

    def __call__(self, x, *, positions, mask, token_mask, deterministic, rng,
                 router_state=None):
        x = x + self.attention(self.attention_norm(x), positions=positions, mask=mask,
                               causal=self.causal)
        execute = (positions % 2 == 0)[..., None]
        y = jnp.where(execute, self.ffn(self.ffn_norm(x)), 0.0)
        real = jnp.ones(positions.shape, bool) if token_mask is None else token_mask
        skipped = jnp.sum(real & (positions % 2 == 1)).astype(jnp.float32)
        aux = MoeAux(ffn_skipped=skipped, ffn_skip_rate=skipped / jnp.sum(real))
        return (x + y).astype(self.dtype), aux



def test_a_block_defined_outside_the_library_trains_reports_and_is_counted():
    model = TransformerLM(vocab_size=16, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                          moe_every=0, block=EvenPositionFfnBlock, dtype="float32",
                          rngs=nnx.Rngs(params=0))
    graphdef, params, rest = split_model(model)
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=LossWeights(),
                                   num_microbatches=1, num_domains=1))
    new_params, _, metrics = step(params, tx.init(params), packed_batch(2, 6), jax.random.PRNGKey(0))
    metrics = jax.device_get(metrics)
    assert np.isfinite(float(metrics["loss"]))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(new_params)))
    stats = metrics["moe"]  # per-layer aux statistics, reduced as the fields declare
    assert sorted(stats) == ["layer_0", "layer_1"]
    for layer in stats.values():
        assert float(layer.ffn_skipped) == 6.0 and float(layer.ffn_skip_rate) == 0.5
    # FLOP counter: each layer's dense FFN (2 * 2 * 8 * 16 forward FLOPs per position)
    # is saved for the 6 skipped positions, x 3 for forward + backward.
    counter = flop_counter(model, batch_size=2, seq_len=6)
    assert sorted(counter.skippable) == ["layer_0", "layer_1"]
    full = counter.step_flops(stats, positions=12, num_microbatches=1)
    realised = counter.realised(stats, positions=12, num_microbatches=1)
    ffn = 2 * 2 * 8 * 16
    assert realised["realised_flops"] == full - 2 * 3 * 6 * ffn  # 2 layers
