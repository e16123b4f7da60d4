"""Decoder-only (and bidirectional encoder) transformer with sparse MoE FFNs."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import Attention, attention_mask, segment_positions
from layers.mlp import DenseMLP
from layers.moe_layer import MoeLayer
from layers.norms import RMSNorm
from layers.params import EMBED, VOCAB, fan_in_init, make_param, normal_init
from moe.dense_to_sparse import DtsState

# MoeLayer arguments that TransformerLM sets itself; everything else may go in moe_kwargs.
_MOE_RESERVED = ("d_model", "d_ff", "num_experts", "k", "causal", "dtype", "param_dtype", "rngs")
_MOE_ALLOWED = tuple(p for p in inspect.signature(MoeLayer.__init__).parameters
                     if p != "self" and p not in _MOE_RESERVED)


@gin.configurable
class TransformerBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)).

    x `[B, S, d_model]` -> (`[B, S, d_model]` in `dtype`, MoE aux dict or None).
    `ffn` is a `DenseMLP` or a `MoeLayer`, built by the caller.
    """

    def __init__(self, attention: Attention, ffn: DenseMLP | MoeLayer, *, d_model: int,
                 causal: bool = True, norm_eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.causal = causal
        self.dtype = dtype
        self.attention_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.attention = attention
        self.ffn_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
        self.ffn = ffn

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoeLayer)

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array | None,
                 token_mask: jax.Array | None, deterministic: bool, rng: jax.Array | None,
                 selection_bias: jax.Array | None, dts_state: DtsState | None = None,
                 ) -> tuple[jax.Array, dict[str, Any] | None]:
        x = x + self.attention(self.attention_norm(x), positions=positions, mask=mask,
                               causal=self.causal)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, mask=token_mask, deterministic=deterministic, rng=rng,
                              selection_bias=selection_bias, dts_state=dts_state)
        else:
            y, aux = self.ffn(h), None
        return (x + y).astype(self.dtype), aux


@gin.configurable
class TransformerLM(nnx.Module):
    """Transformer language model whose FFNs are dense or sparse (MoE).

    inputs `[B, S] int32` -> (logits `[B, S, vocab_size] float32`, aux).

    Layer i (0-based) has a MoE FFN iff `moe_every > 0 and (i + 1) % moe_every
    == 0`: moe_every=1 -> every layer, 2 -> layers 1, 3, 5, ... (Switch /
    GShard "every other FFN", the first layer stays dense), 4 -> 3, 7, ...;
    moe_every=0 -> all dense. Layers are attributes named "layer_{i}".

    Args:
      vocab_size, d_model, num_layers, num_heads: the usual.
      d_ff: hidden size of the dense FFNs.
      num_kv_heads, head_dim, rope_max_wavelength: see `Attention`.
      moe_every: MoE layer spacing (above).
      moe_layers: explicit 0-based indices of the MoE layers (e.g. (1, 2));
        overrides moe_every when given.
      num_experts, k: routed experts per MoE layer and experts per token.
      expert_d_ff: hidden size of each expert (default d_ff).
      moe_kwargs: extra `MoeLayer` arguments (dispatch, capacity_factor,
        routing_type, normalize, score, activation, num_shared_experts,
        shared_d_ff, batch_prioritized, router_* ...). Put MoE options here
        rather than in MoeLayer gin bindings: `dense_baseline` reads them.
      dense_baseline: replace each MoE FFN by a `DenseMLP` with the same
        active parameters per token (router excepted): hidden size
        k * expert_d_ff + num_shared_experts * shared_d_ff, with the experts'
        activation. (For expert choice, "k experts per token" is the average
        only when capacity_factor is None.) The MoE config is still validated.
      activation: activation of the dense FFNs, and of the experts unless
        moe_kwargs sets one.
      causal: True = decoder (causal attention; MoE layers get causal=True and
        refuse expert choice / batch-prioritized routing). False = encoder
        (bidirectional attention, for masked-LM with `mask_tokens`).
      tie_embeddings: logits = x @ embedding.T * d_model**-0.5 (the embedding
        is initialised with std `embed_init_std`, 1.0 by default, so the scale
        keeps initial logits O(1)); otherwise a separate `lm_head`.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype (residual stream, attention, FFN matmuls); the
        router and norms compute in float32 and logits are float32.
      param_dtype: parameter dtype.
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 moe_every: int = 2, moe_layers: Sequence[int] | None = None,
                 num_experts: int = 8, k: int = 2,
                 expert_d_ff: int | None = None, moe_kwargs: Mapping[str, Any] | None = None,
                 dense_baseline: bool = False, activation: str = "relu", causal: bool = True,
                 tie_embeddings: bool = False, embed_init_std: float = 1.0,
                 rope_max_wavelength: float = 10_000.0, norm_eps: float = 1e-6,
                 dtype="bfloat16", param_dtype="float32", rngs: nnx.Rngs):
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("num_layers", num_layers), ("d_ff", d_ff)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= moe_every <= num_layers:
            raise ValueError(f"moe_every must be in [0, num_layers={num_layers}] "
                             f"(0 = all dense), got {moe_every}")
        if moe_layers is not None:
            moe_layers = tuple(int(i) for i in moe_layers)
            bad = [i for i in moe_layers if not 0 <= i < num_layers]
            if bad or len(set(moe_layers)) != len(moe_layers):
                raise ValueError(f"moe_layers must be distinct indices in [0, num_layers="
                                 f"{num_layers}), got {moe_layers}")
        self.moe_layers = moe_layers
        moe_kwargs = dict(moe_kwargs or {})
        for key in moe_kwargs:
            if key in _MOE_RESERVED:
                raise ValueError(f"moe_kwargs may not set {key!r}: TransformerLM sets it "
                                 f"(reserved: {_MOE_RESERVED})")
            if key not in _MOE_ALLOWED:
                raise ValueError(f"unknown moe_kwargs key {key!r}; allowed: {_MOE_ALLOWED}")
        dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
        self.moe_every, self.causal, self.dense_baseline = moe_every, causal, dense_baseline
        self.tie_embeddings = tie_embeddings
        self.dtype = dtype
        expert_d_ff = d_ff if expert_d_ff is None else expert_d_ff
        moe_kwargs.setdefault("activation", activation)

        def moe_layer(layer_rngs: nnx.Rngs) -> MoeLayer:
            return MoeLayer(d_model, expert_d_ff, num_experts, k, causal=causal, dtype=dtype,
                            param_dtype=param_dtype, rngs=layer_rngs, **moe_kwargs)

        if dense_baseline:
            # Shape-only build: validates the MoE config and resolves its sizes.
            spec = nnx.eval_shape(lambda: moe_layer(nnx.Rngs(0)))
            shared = 0 if spec.shared is None else spec.shared.wi.shape[1]
            baseline_d_ff, baseline_act = spec.k * spec.d_ff + shared, spec.experts.activation

        self.embedding = make_param(rngs, normal_init(embed_init_std), (vocab_size, d_model),
                                    (VOCAB, EMBED), param_dtype)
        self.layer_names = tuple(f"layer_{i}" for i in range(num_layers))
        moe_names = []
        for i, name in enumerate(self.layer_names):
            attention = Attention(d_model, num_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, rope_max_wavelength=rope_max_wavelength,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if self.is_moe_index(i) and not dense_baseline:
                ffn = moe_layer(rngs)
                moe_names.append(name)
            elif self.is_moe_index(i):
                ffn = DenseMLP(d_model, baseline_d_ff, activation=baseline_act, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
            else:
                ffn = DenseMLP(d_model, d_ff, activation=activation, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
            setattr(self, name, TransformerBlock(attention, ffn, d_model=d_model, causal=causal,
                                                 norm_eps=norm_eps, dtype=dtype,
                                                 param_dtype=param_dtype, rngs=rngs))
        self.moe_layer_names = tuple(moe_names)
        self.final_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.lm_head = (None if tie_embeddings else
                        make_param(rngs, fan_in_init([0]), (d_model, vocab_size), (EMBED, VOCAB),
                                   param_dtype))

    def is_moe_index(self, i: int) -> bool:
        """Whether layer i sits at a MoE position (True even under dense_baseline)."""
        if self.moe_layers is not None:
            return i in self.moe_layers
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def experts_per_layer(self) -> dict[str, int]:
        """`{moe layer name: number of routed experts}`."""
        return {name: getattr(self, name).ffn.num_experts for name in self.moe_layer_names}

    def param_count(self) -> int:
        return sum(v.size for _, v in nnx.to_flat_state(nnx.state(self, nnx.Param)))

    def active_param_count(self) -> int:
        """Parameters one token uses: all of them, except that each MoE layer's
        routed experts count k / E (embeddings, routers, shared experts in full)."""
        inactive = 0
        for name in self.moe_layer_names:
            moe = getattr(self, name).ffn
            experts = sum(v.size for _, v in nnx.to_flat_state(nnx.state(moe.experts, nnx.Param)))
            inactive += experts - experts // moe.num_experts * moe.k
        return self.param_count() - inactive

    def __call__(self, inputs: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True,
                 rng: jax.Array | None = None,
                 selection_biases: Mapping[str, jax.Array] | None = None,
                 dts_state: DtsState | None = None,
                 ) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
        """inputs `[B, S] int32` -> (logits `[B, S, vocab] float32`, aux).

        segment_ids `[B, S] int32`: packed-sequence ids, 0 = padding; None =
          one segment per row, no padding. Tokens attend only within their
          segment; padding is excluded from MoE routing and its statistics.
        positions `[B, S] int32`: RoPE positions; default: the position within
          the segment (restarting at 0 per segment), or 0..S-1 without
          segment_ids.
        rng: PRNG key for router noise/jitter; layer i gets fold_in(rng, i).
        selection_biases: `{moe layer name: [E] float32}` added to the router
          scores for expert selection only (aux-loss-free balancing).
        dts_state: temperature and hard flag of the EvoMoE dense-to-sparse gate
          (MoE layers with gating='dense_to_sparse', training only).
        aux: `{moe layer name: MoeLayer aux dict}`; dense layers add nothing.
        """
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be [batch, seq], got shape {inputs.shape}")
        batch, seq = inputs.shape
        for arg_name, arg in (("segment_ids", segment_ids), ("positions", positions)):
            if arg is not None and arg.shape != (batch, seq):
                raise ValueError(f"{arg_name} must be [batch, seq]=({batch}, {seq}), "
                                 f"got {arg.shape}")
        selection_biases = dict(selection_biases or {})
        unknown = set(selection_biases) - set(self.moe_layer_names)
        if unknown:
            raise ValueError(f"selection_biases has keys {sorted(unknown)} that are not MoE "
                             f"layers; MoE layers: {self.moe_layer_names}")
        if segment_ids is None:
            mask, token_mask = None, None
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        else:
            mask = attention_mask(segment_ids, causal=self.causal)
            token_mask = segment_ids > 0
            if positions is None:
                positions = segment_positions(segment_ids)

        x = self.embedding[...][inputs].astype(self.dtype)
        aux: dict[str, dict[str, jax.Array]] = {}
        for i, name in enumerate(self.layer_names):
            x, layer_aux = getattr(self, name)(
                x, positions=positions, mask=mask, token_mask=token_mask,
                deterministic=deterministic,
                rng=None if rng is None else jax.random.fold_in(rng, i),
                selection_bias=selection_biases.get(name), dts_state=dts_state)
            if layer_aux is not None:
                aux[name] = layer_aux
        x = self.final_norm(x)
        if self.tie_embeddings:
            logits = jnp.einsum("bsd,vd->bsv", x, self.embedding[...].astype(self.dtype),
                                preferred_element_type=jnp.float32) * self.d_model ** -0.5
        else:
            logits = jnp.einsum("bsd,dv->bsv", x, self.lm_head[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32), aux


def mask_tokens(rng: jax.Array, inputs: jax.Array, segment_ids: jax.Array | None = None, *,
                mask_rate: float = 0.15, mask_id: int, vocab_size: int,
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT masking for the encoder's masked-LM objective.

    Each real token (segment id > 0; all tokens when segment_ids is None) is
    selected with probability `mask_rate`; a selected token becomes `mask_id`
    (80%), a uniform random token in [0, vocab_size) (10%), or stays (10%).

    inputs `[B, S] int32` -> (masked_inputs `[B, S] int32`, targets `[B, S]
    int32` (= inputs), weights `[B, S] float32`: 1.0 on selected tokens).
    """
    if not 0.0 < mask_rate <= 1.0:
        raise ValueError(f"mask_rate must be in (0, 1], got {mask_rate}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id must be in [0, vocab_size={vocab_size}), got {mask_id}")
    select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
    real = jnp.ones(inputs.shape, bool) if segment_ids is None else segment_ids > 0
    selected = real & jax.random.bernoulli(select_rng, mask_rate, inputs.shape)
    kind = jax.random.uniform(kind_rng, inputs.shape)
    random_tokens = jax.random.randint(token_rng, inputs.shape, 0, vocab_size, inputs.dtype)
    replaced = jnp.where(kind < 0.8, jnp.asarray(mask_id, inputs.dtype),
                         jnp.where(kind < 0.9, random_tokens, inputs))
    masked = jnp.where(selected, replaced, inputs)
    return masked, inputs, selected.astype(jnp.float32)
