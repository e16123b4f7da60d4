"""Decoder-only (and bidirectional encoder) transformer with sparse MoE FFNs."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers import renamed
from layers import scan as scan_lib
from layers.attention import Attention, attention_mask, segment_positions
from layers.kv_cache import KVCache
from layers.mlp import DenseMLP
from layers.moe_layer import MoeLayer, active_ffn
from layers.mtp import MTP_AUX
from layers.norms import RMSNorm
from layers.params import EMBED, VOCAB, fan_in_init, make_param, normal_init
from layers.remat import check_remat_policy, remat
from moe.experts import is_glu
from moe.layer_aux import MoeAux, StackedLayerAux
from moe.router_state import MODEL_INPUT_KEYS, RouterState

# TransformerLM arguments replaced by MoeLayer / router bindings (layers.renamed).
_RENAMED_MODEL_ARGS = ("num_experts", "k", "expert_d_ff", "moe_kwargs")


# Every argument is set by TransformerLM, so none is bindable.
@gin.configurable(denylist=["attention", "ffn", "d_model", "causal", "norm_eps", "dtype",
                            "param_dtype", "rngs"])
class TransformerBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)).

    x `[B, S, d_model]` -> (`[B, S, d_model]` in `dtype`, MoeAux or None).
    `ffn` is a dense block or a `MoeLayer`, built by the caller.
    """

    def __init__(self, attention: Attention, ffn: nnx.Module, *, d_model: int,
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
        # A MoE block other than MoeLayer (e.g. SoftMoeLayer) says so with `is_moe_block`.
        return isinstance(self.ffn, MoeLayer) or getattr(self.ffn, "is_moe_block", False)

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array | None,
                 token_mask: jax.Array | None, deterministic: bool, rng: jax.Array | None,
                 router_state: dict[str, jax.Array] | None = None,
                 ) -> tuple[jax.Array, MoeAux | None]:
        x = x + self.attention(self.attention_norm(x), positions=positions, mask=mask,
                               causal=self.causal)
        return self._ffn_residual(x, token_mask=token_mask, deterministic=deterministic, rng=rng,
                                  router_state=router_state)

    def _ffn_residual(self, x: jax.Array, *, token_mask: jax.Array | None, deterministic: bool,
                      rng: jax.Array | None, router_state: dict[str, jax.Array] | None,
                      ) -> tuple[jax.Array, MoeAux | None]:
        """x + ffn(norm(x)) in `dtype`, and the MoE aux (None for a dense FFN)."""
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, mask=token_mask, deterministic=deterministic, rng=rng,
                              router_state=router_state)
        else:
            y, aux = self.ffn(h), None
        return (x + y).astype(self.dtype), aux

    def decode(self, x: jax.Array, *, positions: jax.Array, cache: KVCache,
               cache_index: jax.Array, kv_valid: jax.Array, token_mask: jax.Array,
               router_state: dict[str, jax.Array] | None = None, prefill: bool = False,
               ) -> tuple[jax.Array, KVCache, MoeAux | None]:
        """The block on S new tokens over the layer's KV cache (`Attention.decode`).

        token_mask `[B, S] bool`: the new tokens that are real (pads are kept
        out of MoE routing statistics). -> (`[B, S, d_model]`, updated cache, aux).
        """
        a, cache = self.attention.decode(self.attention_norm(x), positions=positions,
                                         cache=cache, cache_index=cache_index, kv_valid=kv_valid,
                                         prefill=prefill)
        y, aux = self._ffn_residual(x + a, token_mask=token_mask, deterministic=True, rng=None,
                                    router_state=router_state)
        return y, cache, aux


@gin.configurable(denylist=["vocab_size", "rngs"])
class TransformerLM(nnx.Module):
    """Transformer language model whose FFNs are dense or sparse (MoE).

    inputs `[B, S] int32` -> (logits `[B, S, vocab_size] float32`, aux).

    Layer i (0-based) has a MoE FFN iff `moe_every > 0 and (i + 1) % moe_every
    == 0`: moe_every=1 -> every layer, 2 -> layers 1, 3, 5, ... (Switch /
    GShard "every other FFN", the first layer stays dense), 4 -> 3, 7, ...;
    moe_every=0 -> all dense. Layers are attributes named "layer_{i}", except
    the scanned ones (`scan_layers`), which live stacked in `scanned/unit_{j}`;
    `block(name)` finds either by layer name.

    Args:
      vocab_size (set by the caller, from the tokenizer), d_model, num_layers,
        num_heads: the usual.
      d_ff: hidden size of the dense FFNs.
      num_kv_heads, head_dim, rope_max_wavelength: see `Attention`.
      rope_scaling: None, {'rope_type': 'default'}, or Llama 3.1's
        {'rope_type': 'llama3', 'factor': f, 'low_freq_factor': l,
        'high_freq_factor': h, 'original_max_position_embeddings': n}; any other
        rope_type is refused (`layers.attention.check_rope_scaling`).
      attention_bias: q/k/v projection biases (`attention/query_bias [H, h]`,
        `key_bias`/`value_bias [K, h]`), initialised to 0 (Qwen2).
      attention_out_bias: output projection bias (`attention/out_bias
        [d_model]`), initialised to 0 (Llama's attention_bias=True has both).
      qk_norm: None; 'head' = RMSNorm over head_dim of every query/key head
        (Qwen3); 'projection' = RMSNorm over the whole query / key projection
        (OLMoE). Modules `attention/query_norm`, `attention/key_norm`, eps
        norm_eps; applied before RoPE.
      sliding_window: None, or W: query i attends to keys i - W < j <= i
        (Mistral; decoder only).
      attention: the attention factory (gin: `TransformerLM.attention =
        @MLAttention` for multi-head latent attention, `layers.mla`; default
        `Attention`), called as `attention(d_model, num_heads, num_kv_heads=,
        head_dim=, rope_max_wavelength=, rope_scaling=, qkv_bias=, out_bias=,
        qk_norm=, norm_eps=, sliding_window=, dtype=, param_dtype=, rngs=)`; it
        provides `__call__`, `decode` and `init_cache` (its own cache layout).
      moe_every: MoE layer spacing (above).
      moe_layers: explicit 0-based indices of the MoE layers (e.g. (1, 2));
        overrides moe_every when given.
      moe_block: factory of the MoE FFNs (gin: `TransformerLM.moe_block =
        @MoeLayer`), called as `moe_block(d_model, causal=, dtype=,
        param_dtype=, rngs=)`; expert count, k, expert d_ff, dispatch and
        capacity are its own bindings (`MoeLayer.num_experts`, ...), the
        router's options bindings on the router class (`TopKRouter.score`, ...).
      dense_block: factory of the dense FFNs, called as `dense_block(d_model,
        d_ff, activation=, dtype=, param_dtype=, rngs=)`.
      block: factory of the layers (default `TransformerBlock`), called as
        `block(attention, ffn, d_model=, causal=, norm_eps=, dtype=, param_dtype=,
        rngs=)`; returns `(x, MoeAux | None)` (e.g. `@SkipBlock`, `layers.skip`).
      dense_baseline: replace each MoE FFN by a dense block with the same
        active parameters per token (router excepted): hidden size
        k * expert d_ff + num_shared_experts * shared_d_ff, with the experts'
        activation (`layers.moe_layer.active_ffn`; for expert choice, "k
        experts per token" is the average only when capacity_factor is None).
      dense_baseline_k: experts per token of that dense FFN (default: the MoE
        block's k; EvoMoE's dense phase uses 1).
      activation: activation of the dense FFNs (the experts' is `MoeLayer.activation`).
      causal: True = decoder (causal attention; MoE layers get causal=True and
        refuse routers that look at future tokens). False = encoder
        (bidirectional attention, for masked-LM with `mask_tokens`).
      tie_embeddings: logits = x @ embedding.T * d_model**-0.5 (the embedding
        is initialised with std `embed_init_std`, 1.0 by default, so the scale
        keeps initial logits O(1)); otherwise a separate `lm_head`.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype (residual stream, attention, FFN matmuls); the
        router and norms compute in float32 and logits are float32.
      param_dtype: parameter dtype.
      scan_layers: run the repeating unit of the layer pattern (e.g. [dense,
        MoE] for moe_every=2) under one `jax.lax.scan`, its parameters stacked
        along a leading `layers` axis (`layers.scan`: plan, layouts and the
        checkpoint conversion). Same losses and gradients; compile time no
        longer grows with depth.
      remat_policy: what the backward pass keeps of each block's activations:
        'none', 'full', 'save_dots', 'save_moe', 'offload_dots' (`layers.remat`).
      mtp: None, or the multi-token prediction factory (gin: `TransformerLM.mtp =
        @MultiTokenPrediction`, `layers.mtp`), called as `mtp(d_model, make_block=,
        norm_eps=, dtype=, param_dtype=, rngs=)`; `make_block(moe)` builds a block like
        the model's. Run in the training forward only (`deterministic=False`) on the
        final-normed hidden state; its aux is `aux['mtp']` (`layers.mtp.MtpAux`).
      num_experts, k, expert_d_ff, moe_kwargs: deprecated (`layers.renamed`):
        they become arguments of `moe_block`, with a DeprecationWarning.
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 moe_every: int = 2, moe_layers: Sequence[int] | None = None,
                 moe_block: Callable[..., nnx.Module] = MoeLayer,
                 dense_block: Callable[..., nnx.Module] = DenseMLP,
                 block: Callable[..., nnx.Module] = TransformerBlock,
                 dense_baseline: bool = False, dense_baseline_k: int | None = None,
                 activation: str = "relu", causal: bool = True,
                 tie_embeddings: bool = False, embed_init_std: float = 1.0,
                 rope_max_wavelength: float = 10_000.0, norm_eps: float = 1e-6,
                 rope_scaling: dict[str, Any] | None = None, attention_bias: bool = False,
                 attention_out_bias: bool = False, qk_norm: str | None = None,
                 sliding_window: int | None = None,
                 attention: Callable[..., nnx.Module] = Attention,
                 dtype="bfloat16", param_dtype="float32", scan_layers: bool = False,
                 remat_policy: str = "none", mtp: Callable[..., nnx.Module] | None = None,
                 rngs: nnx.Rngs,
                 num_experts: int | None = None, k: int | None = None,
                 expert_d_ff: int | None = None, moe_kwargs: dict[str, Any] | None = None):
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("num_layers", num_layers), ("d_ff", d_ff)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.moe_every, self.moe_layers = moe_every, _check_moe_layers(moe_every, moe_layers,
                                                                        num_layers)
        is_glu(activation)  # validates the name even when every FFN is a MoE block
        if not isinstance(scan_layers, bool):
            raise ValueError(f"TransformerLM.scan_layers must be True or False, got {scan_layers!r}")
        self.remat_policy = check_remat_policy(remat_policy)
        if sliding_window is not None and not causal:
            raise ValueError(f"sliding_window={sliding_window} needs a causal model (causal=True)")
        moe_block = renamed.moe_block_from_old_args(moe_block, dict(
            num_experts=num_experts, k=k, expert_d_ff=expert_d_ff, moe_kwargs=moe_kwargs),
            dense_d_ff=d_ff, activation=activation)
        dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
        self.causal, self.dense_baseline = causal, dense_baseline
        self.tie_embeddings = tie_embeddings
        self.dtype = dtype
        if dense_baseline:
            try:
                baseline_d_ff, baseline_act = active_ffn(moe_block, dense_baseline_k)
            except ValueError as e:  # name the option the value came from
                if dense_baseline_k is None:
                    raise
                raise ValueError(f"TransformerLM.dense_baseline_k={dense_baseline_k}: {e}") from e

        self.embedding = make_param(rngs, normal_init(embed_init_std), (vocab_size, d_model),
                                    (VOCAB, EMBED), param_dtype)
        self.layer_names = tuple(scan_lib.layer_name(i) for i in range(num_layers))
        self.plan = scan_lib.plan_layers([self.is_moe_index(i) for i in range(num_layers)],
                                         scan_layers)
        moe_names, blocks = [], []

        def make_block(moe: bool, baseline: bool = False,
                       factory: Callable[..., nnx.Module] = block) -> nnx.Module:
            mixer = attention(d_model, num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, rope_max_wavelength=rope_max_wavelength,
                              rope_scaling=rope_scaling, qkv_bias=attention_bias,
                              out_bias=attention_out_bias, qk_norm=qk_norm,
                              norm_eps=norm_eps, sliding_window=sliding_window,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if moe:
                ffn = moe_block(d_model, causal=causal, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
            else:
                size, act = (baseline_d_ff, baseline_act) if baseline else (d_ff, activation)
                ffn = dense_block(d_model, size, activation=act, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
            return factory(mixer, ffn, d_model=d_model, causal=causal,
                                    norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)

        for i, name in enumerate(self.layer_names):
            moe = self.is_moe_index(i) and not dense_baseline
            blocks.append(make_block(moe, baseline=self.is_moe_index(i)))
            if moe:
                moe_names.append(name)
        for i in self.plan.unscanned():
            setattr(self, self.layer_names[i], blocks[i])
        self.scanned = (scan_lib.ScannedUnits([[blocks[i] for i in self.plan.unit_layers(j)]
                                               for j in range(self.plan.unit)])
                        if self.plan.repeats else None)
        self.moe_layer_names = tuple(moe_names)
        self.final_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.lm_head = (None if tie_embeddings else
                        make_param(rngs, fan_in_init([0]), (d_model, vocab_size), (EMBED, VOCAB),
                                   param_dtype))
        # MTP modules get plain blocks, whatever `block` the model's layers use.
        self.mtp = None if mtp is None else mtp(
            d_model, make_block=functools.partial(make_block, factory=TransformerBlock),
            norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def is_moe_index(self, i: int) -> bool:
        """Whether layer i sits at a MoE position (True even under dense_baseline)."""
        if self.moe_layers is not None:
            return i in self.moe_layers
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def block(self, name: str) -> TransformerBlock:
        """Layer `name`'s block. A scanned layer's is its unit position's stacked
        block (shared by every repeat): read its settings, not its parameters."""
        location = self.plan.location(self.layer_names.index(name))
        if location is None:
            return getattr(self, name)
        return self.scanned.unit(location[1])

    def layer_repeats(self, name: str) -> int:
        """How many layers share `block(name)`'s stacked parameters (1 = unscanned)."""
        return 1 if self.plan.location(self.layer_names.index(name)) is None else self.plan.repeats

    def moe_layer(self, name: str) -> MoeLayer:
        return self.block(name).ffn

    @property
    def experts_per_layer(self) -> dict[str, int]:
        """`{moe layer name: number of routed experts}`."""
        return {name: self.moe_layer(name).num_experts for name in self.moe_layer_names}

    @property
    def router_state_keys(self) -> dict[str, tuple[str, ...]]:
        """`{moe layer name: router-state keys its router reads}` (`moe.router_state`)."""
        return {name: self.moe_layer(name).router.state_keys for name in self.moe_layer_names}

    def _with_model_inputs(self, router_state: RouterState, inputs: jax.Array) -> RouterState:
        """The state plus the model inputs (`moe.router_state.MODEL_INPUT_KEYS`, e.g. the token
        ids of hash routing) that some MoE layer's router declares in its `state_keys`."""
        needed = {key for keys in self.router_state_keys.values() for key in keys}
        return router_state.with_model_inputs(needed & set(MODEL_INPUT_KEYS), token_ids=inputs)

    def param_count(self) -> int:
        return sum(v.size for _, v in nnx.to_flat_state(nnx.state(self, nnx.Param)))

    def active_param_count(self, seq_len: int | None = None) -> int:
        """Parameters one token uses: all of them, except that routed experts count
        k / E (embeddings, routers, shared experts in full), or the fraction the MoE
        block declares (`active_expert_fraction(seq_len)`, e.g. Soft MoE's p / seq_len).
        Expert weights used by several layers (WideNet, or one scanned stack) are
        counted once, as in `param_count`."""
        inactive, seen = 0, set()
        for name in self.moe_layer_names:
            moe = self.moe_layer(name)
            if id(moe.experts) in seen:
                continue
            seen.add(id(moe.experts))
            experts = sum(v.size for _, v in nnx.to_flat_state(nnx.state(moe.experts, nnx.Param)))
            fraction = (moe.active_expert_fraction(seq_len)
                        if hasattr(moe, "active_expert_fraction") else moe.k / moe.num_experts)
            inactive += experts - round(experts * fraction)
        return self.param_count() - inactive

    def __call__(self, inputs: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True,
                 rng: jax.Array | None = None, router_state: RouterState | None = None,
                 ) -> tuple[jax.Array, dict[str, MoeAux]]:
        """inputs `[B, S] int32` -> (logits `[B, S, vocab] float32`, aux).

        segment_ids `[B, S] int32`: packed-sequence ids, 0 = padding; None =
          one segment per row, no padding. Tokens attend only within their
          segment; padding is excluded from MoE routing and its statistics.
        positions `[B, S] int32`: RoPE positions; default: the position within
          the segment (restarting at 0 per segment), or 0..S-1 without
          segment_ids.
        rng: PRNG key for router noise/jitter; layer i gets fold_in(rng, i).
        router_state: per-step router inputs (selection biases, dense-to-sparse
          temperature ...); MoE layer `name` gets `router_state.for_layer(name)`.
        aux: `{moe layer name: MoeAux}`; dense layers add nothing. With scanned
          layers a `moe.layer_aux.StackedLayerAux` (a mapping whose scanned
          layers stay stacked per unit position; `aux[name]` slices one out).
        """
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be [batch, seq], got shape {inputs.shape}")
        batch, seq = inputs.shape
        for arg_name, arg in (("segment_ids", segment_ids), ("positions", positions)):
            if arg is not None and arg.shape != (batch, seq):
                raise ValueError(f"{arg_name} must be [batch, seq]=({batch}, {seq}), "
                                 f"got {arg.shape}")
        router_state = RouterState() if router_state is None else router_state
        router_state.check_layers(self.moe_layer_names)
        router_state = self._with_model_inputs(router_state, inputs)
        if segment_ids is None:
            mask, token_mask = None, None
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        else:
            mask = attention_mask(segment_ids, causal=self.causal)
            token_mask = segment_ids > 0
            if positions is None:
                positions = segment_positions(segment_ids)

        x = self.embed(inputs)
        aux: dict[str, MoeAux] = {}
        call = dict(positions=positions, mask=mask, token_mask=token_mask,
                    deterministic=deterministic)

        def run(block: TransformerBlock, x: jax.Array, i: jax.Array | int,
                state: dict[str, jax.Array]) -> tuple[jax.Array, MoeAux | None]:
            return block(x, rng=None if rng is None else jax.random.fold_in(rng, i),
                         router_state=state, **call)

        for i in range(self.plan.start):
            x = self._unscanned(run, x, i, router_state, aux)
        if self.scanned is None:
            groups = []
        else:
            x, groups = self._scan(run, x, router_state)
        for i in range(self.plan.stop, self.num_layers):
            x = self._unscanned(run, x, i, router_state, aux)
        x = self.final_norm(x)
        if self.mtp is not None and not deterministic:  # training only (layers.mtp)
            aux[MTP_AUX], mtp_layers = self.mtp(
                x, inputs, embed=self.embed, head=self.head, segment_ids=segment_ids,
                rng=rng, block_kwargs=dict(call, router_state=router_state.shared))
            aux.update(mtp_layers)
        if groups:  # scanned layers' aux stays stacked
            groups += [((n,), jax.tree.map(lambda a: a[None], a)) for n, a in aux.items()]
            named = {n for names, _ in groups for n in names}
            layer_set = set(self.layer_names)
            aux = StackedLayerAux(groups, order=[n for n in self.layer_names if n in named]
                                  + [n for n in aux if n not in layer_set])
        return self.head(x), aux

    def _unscanned(self, run, x: jax.Array, i: int, router_state: RouterState,
                   aux: dict[str, MoeAux]) -> jax.Array:
        """Unscanned layer i (`run(block, x, i, its router state)`), under the remat policy."""
        name = self.layer_names[i]
        block, state = getattr(self, name), router_state.for_layer(name)
        if self.remat_policy == "none":
            x, layer_aux = run(block, x, i, state)
        else:
            graphdef, params = nnx.split(block)

            def layer(params, x, state):
                return run(nnx.merge(graphdef, params), x, i, state)

            x, layer_aux = remat(layer, self.remat_policy)(params, x, state)
        if layer_aux is not None:
            aux[name] = layer_aux
        return x

    def _scan(self, run, x: jax.Array, router_state: RouterState,
              ) -> tuple[jax.Array, list[tuple[tuple[str, ...], MoeAux]]]:
        """The scanned layers: one `lax.scan` over the repeats of the unit. Each
        repeat r gets its layers' router state (stacked over r) and returns its
        layers' aux: -> (x, [(layer names of unit position j, their aux stacked
        `[R, ...]`)] for the MoE positions)."""
        plan = self.plan
        states = tuple(_stack_router_states([router_state.for_layer(self.layer_names[i])
                                             for i in plan.unit_layers(j)])
                       for j in range(plan.unit))

        def body(units, x, r, states):
            auxes = []
            for j in range(plan.unit):
                x, layer_aux = run(units.unit(j), x, plan.start + r * plan.unit + j, states[j])
                auxes.append(layer_aux)
            return x, tuple(auxes)

        x, auxes = scan_lib.scan_units(self.scanned, body, x, states,
                                       lambda f: remat(f, self.remat_policy, prevent_cse=False))
        return x, [(tuple(self.layer_names[i] for i in plan.unit_layers(j)), stacked)
                   for j, stacked in enumerate(auxes) if stacked is not None]

    def unrolled_blocks(self):
        """`(layer name, block)` in layer order, a scanned layer's block sliced out
        of the stack (for code that runs layer by layer, e.g. `decode`)."""
        for i, name in enumerate(self.layer_names):
            location = self.plan.location(i)
            yield name, (getattr(self, name) if location is None
                         else scan_lib.slice_module(self.scanned.unit(location[1]), location[0]))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """`[B, S] int32` -> `[B, S, d_model]` in the compute dtype."""
        return self.embedding[...][tokens].astype(self.dtype)

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output projection: x `[B, S, d_model]` -> `[B, S, vocab] float32`."""
        return self.head(self.final_norm(x))

    def head(self, x: jax.Array) -> jax.Array:
        """The output projection of normed x `[B, S, d_model]` -> `[B, S, vocab] float32`."""
        if self.tie_embeddings:
            logits = jnp.einsum("bsd,vd->bsv", x, self.embedding[...].astype(self.dtype),
                                preferred_element_type=jnp.float32) * self.d_model ** -0.5
        else:
            logits = jnp.einsum("bsd,dv->bsv", x, self.lm_head[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> dict[str, KVCache]:
        """An empty KV cache `{layer name: the layer's attention cache}` in the compute dtype:
        `{'key', 'value': [batch, max_len, K, head_dim]}` for `Attention` (`layers.kv_cache`),
        `{'c_kv': [batch, max_len, kv_lora_rank], 'k_rope': [batch, max_len,
        qk_rope_head_dim]}` for `layers.mla.MLAttention`. Every leaf is `[batch, max_len, ...]`."""
        return {name: self.block(name).attention.init_cache(batch, max_len, self.dtype)
                for name in self.layer_names}

    def decode(self, inputs: jax.Array, *, positions: jax.Array, cache: dict[str, KVCache],
               cache_index: jax.Array, kv_valid: jax.Array,
               router_state: RouterState | None = None, prefill: bool = False,
               last_only: bool = False,
               ) -> tuple[jax.Array, dict[str, KVCache], dict[str, MoeAux]]:
        """S new tokens through the model with a KV cache: prefill (S = the prompt
        bucket) and decode steps (S = 1) alike. Causal decoders only; deterministic.

        inputs `[B, S] int32`; positions `[B, S] int32` (RoPE positions: real
        tokens counted from 0 per row, whatever the padding); cache from
        `init_cache(B, L)` (or a previous call); cache_index: scalar int32, the
        slot of inputs[:, 0] (the new tokens take slots cache_index ..
        cache_index+S-1, which must fit in L); kv_valid `[B, L] bool`: slots
        holding real tokens once these are written (pads: False). MoE layers
        run their training call (same router, `router_state` selection
        biases) with the pads masked out; capacity is the layer's eval capacity
        (make it dropless for generation: `eval_capacity_factor = None`).
        prefill: these are the first tokens (cache_index 0, an empty cache):
        attention reads only their own keys (`Attention.decode`), same result.
        last_only: compute the logits of the last position only (`[B, 1, vocab]`;
        a prefill needs no more, and `[B, S, vocab]` float32 is large).
        -> (logits `[B, S, vocab] float32`, the updated cache, aux `{moe layer: MoeAux}`).
        """
        x, new_cache, aux = self.decode_hidden(inputs, positions=positions, cache=cache,
                                               cache_index=cache_index, kv_valid=kv_valid,
                                               router_state=router_state, prefill=prefill)
        return self._logits(x[:, -1:] if last_only else x), new_cache, aux

    def decode_hidden(self, inputs: jax.Array, *, positions: jax.Array,
                      cache: dict[str, KVCache], cache_index: jax.Array, kv_valid: jax.Array,
                      router_state: RouterState | None = None, prefill: bool = False,
                      ) -> tuple[jax.Array, dict[str, KVCache], dict[str, MoeAux]]:
        """`decode` before the final norm and head: -> (hidden `[B, S, d_model]`, cache, aux)."""
        if not self.causal:
            raise ValueError("decode needs a causal decoder (TransformerLM.causal = True)")
        batch, seq = inputs.shape
        if positions.shape != (batch, seq):
            raise ValueError(f"positions must be [batch, seq]=({batch}, {seq}), "
                             f"got {positions.shape}")
        if kv_valid.ndim != 2 or kv_valid.shape[0] != batch:
            raise ValueError(f"kv_valid must be [batch={batch}, max_len], got {kv_valid.shape}")
        router_state = RouterState() if router_state is None else router_state
        router_state.check_layers(self.moe_layer_names)
        router_state = self._with_model_inputs(router_state, inputs)
        token_mask = jax.lax.dynamic_slice(kv_valid, (0, jnp.asarray(cache_index, jnp.int32)),
                                           (batch, seq))
        x = self.embed(inputs)
        new_cache: dict[str, KVCache] = {}
        aux: dict[str, MoeAux] = {}
        for name, block in self.unrolled_blocks():
            x, new_cache[name], layer_aux = block.decode(
                x, positions=positions, cache=cache[name], cache_index=cache_index,
                kv_valid=kv_valid, token_mask=token_mask,
                router_state=router_state.for_layer(name), prefill=prefill)
            if layer_aux is not None:
                aux[name] = layer_aux
        return x, new_cache, aux


def _stack_router_states(states: Sequence[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """The router states of one unit position's layers, stacked over the repeats.

    A key some of these layers lack is zero for them (a zero selection bias
    selects as no bias); its shape and dtype must agree where it is given."""
    given: dict[str, jax.Array] = {}
    for state in states:
        for k, v in state.items():
            given.setdefault(k, jnp.asarray(v))
    out = {}
    for k, like in sorted(given.items()):
        values = [jnp.asarray(s[k]) if k in s else jnp.zeros_like(like) for s in states]
        if any(v.shape != like.shape or v.dtype != like.dtype for v in values):
            got = [(v.shape, v.dtype.name) for v in values]
            raise ValueError(f"router state {k!r}: the scanned layers at one unit position "
                             f"need one shape and dtype, got {got}")
        out[k] = jnp.stack(values)
    return out


def _check_moe_layers(moe_every: int, moe_layers: Sequence[int] | None,
                      num_layers: int) -> tuple[int, ...] | None:
    if not 0 <= moe_every <= num_layers:
        raise ValueError(f"moe_every must be in [0, num_layers={num_layers}] "
                         f"(0 = all dense), got {moe_every}")
    if moe_layers is None:
        return None
    moe_layers = tuple(int(i) for i in moe_layers)
    bad = [i for i in moe_layers if not 0 <= i < num_layers]
    if bad or len(set(moe_layers)) != len(moe_layers):
        raise ValueError(f"moe_layers must be distinct indices in [0, num_layers="
                         f"{num_layers}), got {moe_layers}")
    return moe_layers


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
