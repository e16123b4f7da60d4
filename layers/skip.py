"""Learning to Skip (Zeng et al. 2023, arXiv 2311.15436): a binary router per layer or
per module decides, per token, whether to run it; a skipped token passes through
the residual unchanged (docs/conditional_compute.md).

`TransformerLM.block = @SkipBlock` makes every layer a `SkipBlock`. For a module f
(attention, or the FFN / MoE block) with pre-norm input h_t = norm(x_t):

  p_t = sigmoid(w . h_t + b)                         (float32; w [d], b [] per router)
  g_t = 1[p_t > 1/2]                                 (forward: a hard 0/1 decision)
  y_t = x_t + g_t * f(h)_t

Training makes g differentiable with a straight-through estimator (`estimator`):

  'ste':    g = 1[p > 1/2] + p - stop_gradient(p)           (d g / d logit = p (1 - p))
  'gumbel': s = sigmoid((logit + log u - log(1 - u)) / tau), u ~ U(0, 1);
            g = 1[s > 1/2] + s - stop_gradient(s)          (binary-concrete straight-through)

and a compute-budget regulariser pulls the mean execute probability over real tokens,
r = mean_t p_t, toward 1 - `target_skip_rate` (rho):

  'square': L = (r - (1 - rho))^2        'hinge': L = max(0, r - (1 - rho))

summed over the layer's routers (`MoeAux.skip_loss`, weighted by
`LossWeights.skip_weight`). Evaluation uses the hard gate. Training computes f on
every token (the straight-through gradient needs f(h) of skipped tokens too); with
`inference='route_out'` a deterministic call takes skipped tokens out of the
computation: the executed tokens move to the front and loops over row tiles run only
as many tiles as they fill (a dense FFN: `dense_rows`; the attention's queries,
scores, values and output projection: `attention_rows`, keys and values are still
projected for every token). A MoE block gets the skipped tokens masked out: they
leave its routing statistics and, dropless, its expert rows (`MoeLayer` sends masked
tokens to the sentinel group E; a capacity dispatch keeps its buffer sizes).
"""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Attention
from layers.kv_cache import KVCache
from layers.params import EMBED, constant_param, make_param, normal_init
from layers.transformer import TransformerBlock
from moe.layer_aux import MoeAux
from moe.validation import check_one_of

Array = jax.Array

SKIP_UNITS = ("layer", "attention", "ffn", "modules")
ESTIMATORS = ("ste", "gumbel")
BUDGET_LOSSES = ("square", "hinge")
INFERENCE_MODES = ("route_out", "mask")
MODULES = ("attention", "ffn")
_BLOCK_DENYLIST = ["attention", "ffn", "d_model", "causal", "norm_eps", "dtype", "param_dtype",
                   "rngs"]


class SkipRouter(nnx.Module):
    """The binary router of one module: logits `w . h + b` (float32).

    Parameters `kernel [d]` (axis embed, N(0, 0.02^2)) and `bias []` (`init_bias`;
    positive = mostly execute at the start)."""

    def __init__(self, d_model: int, *, init_bias: float, param_dtype, rngs: nnx.Rngs):
        self.kernel = make_param(rngs, normal_init(0.02), (d_model,), (EMBED,), param_dtype)
        self.bias = constant_param(init_bias, (), (), param_dtype)

    def __call__(self, h: Array) -> Array:
        """h `[B, S, d]` -> logits `[B, S] float32`."""
        return (jnp.einsum("bsd,d->bs", h.astype(jnp.float32),
                           self.kernel[...].astype(jnp.float32))
                + self.bias[...].astype(jnp.float32))


def skip_gate(logits: Array, *, estimator: str, deterministic: bool, rng: Array | None,
              temperature: float = 1.0) -> tuple[Array, Array]:
    """logits `[B, S] float32` -> (gate `[B, S] float32`: 0/1 in the forward pass, with
    the straight-through gradient in training; p = sigmoid(logits) `[B, S]`)."""
    prob = jax.nn.sigmoid(logits)
    if deterministic:
        return (logits > 0).astype(jnp.float32), prob
    soft = prob
    if estimator == "gumbel":
        if rng is None:
            raise ValueError("SkipBlock.estimator='gumbel' needs an rng in training "
                             "(TransformerLM(..., deterministic=False, rng=key))")
        u = jax.random.uniform(rng, logits.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
        soft = jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / temperature)
    hard = (soft > 0.5).astype(jnp.float32)
    return hard + (soft - jax.lax.stop_gradient(soft)), prob


def budget_loss(prob: Array, real: Array, target_skip_rate: float, kind: str) -> Array:
    """The compute-budget regulariser of one router: prob, real `[B, S]` -> scalar."""
    rate = jnp.sum(prob * real) / jnp.maximum(jnp.sum(real), 1.0)  # mean execute probability
    gap = rate - (1.0 - target_skip_rate)
    return jnp.square(gap) if kind == "square" else jnp.maximum(gap, 0.0)


def dense_rows(ffn: nnx.Module, h: Array, execute: Array, tile: int = 256) -> Array:
    """A position-wise FFN on the executed tokens only: h `[B, S, d]`, execute `[B, S]
    bool` -> `[B, S, d]`, zeros at skipped tokens. The executed rows move to the front
    (stable) and a loop over tiles of `tile` rows runs ceil(executed / tile) times
    (`ffn` on `[1, tile, d]`), so skipped rows cost no FFN work."""
    batch, seq, d = h.shape
    flat = execute.reshape(-1)
    order = jnp.argsort(~flat, stable=True)
    tile = min(tile, batch * seq)
    pad = -(-(batch * seq) // tile) * tile - batch * seq
    rows = jnp.pad(h.reshape(batch * seq, d)[order], ((0, pad), (0, 0)))

    def body(t, out):
        y = ffn(jax.lax.dynamic_slice_in_dim(rows, t * tile, tile)[None])[0]
        return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), t * tile, 0)

    steps = -(-jnp.sum(flat, dtype=jnp.int32) // tile)
    out = jax.lax.fori_loop(0, steps, body, jnp.zeros(rows.shape, h.dtype))[:batch * seq]
    out = jnp.zeros_like(out).at[order].set(out)
    return jnp.where(flat[:, None], out, 0).reshape(batch, seq, d)


def attention_rows(attention: Attention, h: Array, execute: Array, *, positions: Array,
                   mask: Array | None, causal: bool, tile: int = 64) -> Array:
    """`Attention` for the executed queries only: h `[B, S, d]`, execute `[B, S] bool` ->
    `[B, S, d]`, zeros at skipped tokens. Keys and values are projected for every token
    (the others attend to them); per row the executed queries move to the front
    (stable) and a loop over query tiles of `tile` rows runs ceil(max executed / tile)
    times, so the scores, values and output projection of skipped queries are not
    computed (the query projection is)."""
    batch, seq, _ = h.shape
    q, k, v = attention.qkv(h, positions)
    index = jnp.arange(seq)
    allowed = (jnp.ones((batch, 1, seq, seq), bool) if mask is None
               else jnp.broadcast_to(mask, (batch, 1, seq, seq)))
    if causal:
        allowed &= index[None, None, None, :] <= index[None, None, :, None]
    if attention.sliding_window is not None:
        allowed &= index[:, None] - index[None, :] < attention.sliding_window
    order = jnp.argsort(~execute, axis=1, stable=True)  # [B, S] executed queries first
    tile = min(tile, seq)
    padded = -(-seq // tile) * tile
    pad = ((0, 0), (0, padded - seq))
    q = jnp.pad(jnp.take_along_axis(q, order[:, :, None, None], axis=1), pad + ((0, 0),) * 2)
    rows = jnp.pad(jnp.take_along_axis(allowed, order[:, None, :, None], axis=2),
                   ((0, 0), (0, 0), (0, padded - seq), (0, 0)))
    steps = -(-jnp.max(jnp.sum(execute, axis=1)) // tile)

    def body(t, out):
        q_t = jax.lax.dynamic_slice_in_dim(q, t * tile, tile, axis=1)
        rows_t = jax.lax.dynamic_slice_in_dim(rows, t * tile, tile, axis=2)
        o = jax.nn.dot_product_attention(q_t, k, v, mask=rows_t)
        return jax.lax.dynamic_update_slice_in_dim(out, attention.output(o), t * tile, axis=1)

    out = jax.lax.fori_loop(0, steps, body, jnp.zeros((batch, padded, h.shape[-1]), q.dtype))
    out = jnp.zeros_like(out[:, :seq]).at[jnp.arange(batch)[:, None], order].set(out[:, :seq])
    return jnp.where(execute[..., None], out, 0)


@gin.configurable(denylist=_BLOCK_DENYLIST)
class SkipBlock(TransformerBlock):
    """A `TransformerBlock` whose layer, or whose modules, a token may skip.

    `TransformerLM.block = @SkipBlock`. Returns `(x [B, S, d], MoeAux)` for every
    layer: a MoE layer's aux with the skip fields added, a dense layer's with only
    them (`skip_loss`, `attention_skip_rate`, `ffn_skip_rate`, `attention_skipped`,
    `ffn_skipped`, over real tokens).

    Args (gin: `SkipBlock.<name>`):
      unit: what a router decides: 'layer' (one router on norm(x); attention and
        FFN run or are skipped together), 'attention', 'ffn' (the FFN or MoE block),
        or 'modules' (attention and FFN, each with its own router).
      target_skip_rate: rho in [0, 1), the fraction of tokens the regulariser
        aims to skip at each router.
      budget_loss: 'square' or 'hinge' (module docstring).
      estimator: 'ste' or 'gumbel' (module docstring).
      temperature: tau of 'gumbel' (> 0).
      init_bias: initial router bias (2.0: sigmoid = 0.88, most tokens run at first).
      inference: 'route_out' (deterministic calls take skipped tokens out of the
        FFN and, for `Attention`, out of the attention queries) or 'mask' (compute
        every token and zero the skipped ones; the reference).
    Set by `TransformerLM` (refused in gin): attention, ffn, d_model, causal,
      norm_eps, dtype, param_dtype, rngs.
    """

    def __init__(self, attention: Attention, ffn: nnx.Module, *, d_model: int,
                 causal: bool = True, norm_eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, unit: str = "layer",
                 target_skip_rate: float = 0.5, budget_loss: str = "square",
                 estimator: str = "ste", temperature: float = 1.0, init_bias: float = 2.0,
                 inference: str = "route_out"):
        check_one_of("SkipBlock.unit", unit, SKIP_UNITS)
        check_one_of("SkipBlock.budget_loss", budget_loss, BUDGET_LOSSES)
        check_one_of("SkipBlock.estimator", estimator, ESTIMATORS)
        check_one_of("SkipBlock.inference", inference, INFERENCE_MODES)
        if not 0.0 <= target_skip_rate < 1.0:
            raise ValueError(f"SkipBlock.target_skip_rate must be in [0, 1), got "
                             f"{target_skip_rate!r}")
        if not temperature > 0:
            raise ValueError(f"SkipBlock.temperature must be > 0, got {temperature!r}")
        super().__init__(attention, ffn, d_model=d_model, causal=causal, norm_eps=norm_eps,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.unit, self.target_skip_rate = unit, target_skip_rate
        self.budget_kind, self.estimator = budget_loss, estimator
        self.temperature, self.inference = temperature, inference
        routers = {"layer": ("layer",), "attention": ("attention",), "ffn": ("ffn",),
                   "modules": MODULES}[unit]
        make = lambda: SkipRouter(d_model, init_bias=init_bias, param_dtype=param_dtype,
                                  rngs=rngs)
        self.layer_router = make() if "layer" in routers else None
        self.attention_router = make() if "attention" in routers else None
        self.ffn_router = make() if "ffn" in routers else None

    @property
    def skip_modules(self) -> tuple[str, ...]:
        """The modules a token may skip (the FLOP counter reads `<module>_skipped`)."""
        return MODULES if self.unit in ("layer", "modules") else (self.unit,)

    def _gate(self, router: SkipRouter, h: Array, real: Array, deterministic: bool,
              rng: Array | None, salt: int) -> tuple[Array, Array]:
        """(gate `[B, S]`, this router's budget loss)."""
        key = None if rng is None else jax.random.fold_in(rng, 0x5C1B + salt)
        gate, prob = skip_gate(router(h), estimator=self.estimator, deterministic=deterministic,
                               rng=key, temperature=self.temperature)
        return gate, budget_loss(prob, real, self.target_skip_rate, self.budget_kind)

    def __call__(self, x: Array, *, positions: Array, mask: Array | None,
                 token_mask: Array | None, deterministic: bool, rng: Array | None,
                 router_state: dict[str, Array] | None = None) -> tuple[Array, MoeAux]:
        real = (jnp.ones(x.shape[:2], jnp.float32) if token_mask is None
                else token_mask.astype(jnp.float32))
        h = self.attention_norm(x)
        gates, losses = {}, []
        if self.layer_router is not None:
            gate, loss = self._gate(self.layer_router, h, real, deterministic, rng, 0)
            gates = {"attention": gate, "ffn": gate}
            losses.append(loss)
        if self.attention_router is not None:
            gates["attention"], loss = self._gate(self.attention_router, h, real,
                                                  deterministic, rng, 1)
            losses.append(loss)
        gate = gates.get("attention")
        if (gate is not None and deterministic and self.inference == "route_out"
                and type(self.attention) is Attention):
            x = x + attention_rows(self.attention, h, gate > 0, positions=positions, mask=mask,
                                   causal=self.causal).astype(x.dtype)
        else:
            x = x + _gated(self.attention(h, positions=positions, mask=mask, causal=self.causal),
                           gate)
        h = self.ffn_norm(x)
        if self.ffn_router is not None:
            gates["ffn"], loss = self._gate(self.ffn_router, h, real, deterministic, rng, 2)
            losses.append(loss)
        y, aux = self._ffn(h, gates.get("ffn"), token_mask=token_mask,
                           deterministic=deterministic, rng=rng, router_state=router_state)
        x = (x + y).astype(self.dtype)
        return x, _skip_aux(aux, gates, real, sum(losses))

    def _ffn(self, h: Array, gate: Array | None, *, token_mask: Array | None,
             deterministic: bool, rng: Array | None, router_state: dict[str, Array] | None,
             ) -> tuple[Array, MoeAux | None]:
        """The FFN output `[B, S, d]` times the gate (zero at skipped tokens) and its aux."""
        route_out = gate is not None and deterministic and self.inference == "route_out"
        if not self.is_moe:
            if route_out:
                return dense_rows(self.ffn, h, gate > 0).astype(h.dtype), None
            return _gated(self.ffn(h), gate), None
        moe_mask = token_mask
        if route_out:  # skipped tokens leave the routing and (dropless) the expert rows
            moe_mask = (gate > 0) if token_mask is None else (token_mask & (gate > 0))
        y, aux = self.ffn(h, mask=moe_mask, deterministic=deterministic, rng=rng,
                          router_state=router_state)
        return _gated(y, gate), aux

    def decode(self, x: Array, *, positions: Array, cache: KVCache, cache_index: Array,
               kv_valid: Array, token_mask: Array, router_state: dict[str, Array] | None = None,
               prefill: bool = False) -> tuple[Array, KVCache, MoeAux | None]:
        """`TransformerBlock.decode` with the hard gates (a skipped token's keys and
        values still enter the cache). Returns the MoE aux only (no skip fields)."""
        h = self.attention_norm(x)
        gates = {}
        if self.layer_router is not None:
            gates["attention"] = gates["ffn"] = (self.layer_router(h) > 0).astype(jnp.float32)
        if self.attention_router is not None:
            gates["attention"] = (self.attention_router(h) > 0).astype(jnp.float32)
        a, cache = self.attention.decode(h, positions=positions, cache=cache,
                                         cache_index=cache_index, kv_valid=kv_valid,
                                         prefill=prefill)
        x = x + _gated(a, gates.get("attention"))
        h = self.ffn_norm(x)
        if self.ffn_router is not None:
            gates["ffn"] = (self.ffn_router(h) > 0).astype(jnp.float32)
        y, aux = self._ffn(h, gates.get("ffn"), token_mask=token_mask, deterministic=True,
                           rng=None, router_state=router_state)
        return (x + y).astype(self.dtype), cache, aux


def _gated(y: Array, gate: Array | None) -> Array:
    """y `[B, S, d]` times gate `[B, S]` (exactly y where the gate is 1)."""
    return y if gate is None else y * gate[..., None].astype(y.dtype)


def _skip_aux(aux: MoeAux | None, gates: dict[str, Any], real: Array, loss: Array) -> MoeAux:
    """The layer's aux (a new one for a dense FFN) with the skip fields over real tokens."""
    fields = {"skip_loss": jnp.asarray(loss, jnp.float32)}
    tokens = jnp.maximum(jnp.sum(real), 1.0)
    for module in MODULES:
        if module in gates:
            skipped = jnp.sum((1.0 - jax.lax.stop_gradient(gates[module])) * real)
            fields[f"{module}_skipped"] = skipped
            fields[f"{module}_skip_rate"] = skipped / tokens
    return (MoeAux() if aux is None else aux).replace(**fields)
