"""Self-speculative greedy decoding with the multi-token prediction head (`layers.mtp`).

    generator = SpeculativeGenerator(restore.restore_model(workdir))   # a run with MTP
    new_ids = generator.generate([[1, 72, 101]], max_new_tokens=32, eos_ids=[2])
    generator.last_stats.acceptance_rate

Each step feeds the main model two tokens: g, the last token emitted (not yet in the
cache), and d, the MTP module's draft of the token after it. The main model's greedy
choices a0 (after g) and a1 (after d) are exact, so:

  * d == a0: both are emitted (d, a1), the cursor moves two slots;
  * else:    a0 is emitted, the cursor moves one slot (d's cache entries are
             overwritten by the next step's).

The MTP module (depth 1) keeps its own KV cache: at slot j it reads the main model's
final-normed hidden state at j and the embedding of the token at j+1 (layers.mtp), so
after the step its output at the last accepted slot drafts the next token. The output
is that of plain greedy decoding (`generate.Generator`, `SamplingConfig()`): every
emitted token is the main model's argmax given the emitted prefix; only the number of
main-model calls changes. Numerically, the main model here scores two new tokens per call
(plain decoding one), which can differ in the last bits; a tie within that margin could
in principle pick another token (not seen in the tests).

Prompts run one at a time (batch 1: rows accept different numbers of tokens), with the
same padding and buckets as `generate` (prompt left-padded to P, cache L >=
P + max_new_tokens + 1 slots). The host loop syncs once per step, so this measures
acceptance, not speed (`SpeculativeStats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib


@dataclasses.dataclass
class SpeculativeStats:
    """Counts of the last `SpeculativeGenerator.generate` call.

    drafts: draft tokens verified (one per main-model step after the prefill);
    accepted: drafts equal to the main model's greedy token; new_tokens: tokens emitted.
    """

    num_prompts: int
    new_tokens: int
    drafts: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per main-model call (the prefill included)."""
        return self.new_tokens / max(self.drafts + self.num_prompts, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_step": self.tokens_per_step}


class SpeculativeGenerator(generate_lib.Generator):
    """Greedy generation drafted by the model's first MTP module (module doc); the prompt
    and id checks are `Generator`'s."""

    def __init__(self, restored: restore_lib.RestoredModel):
        super().__init__(restored)
        model = restored.model()
        if getattr(model, "mtp", None) is None or model.mtp.depth < 1:
            raise ValueError("self-speculative decoding needs a model with multi-token "
                             "prediction (TransformerLM.mtp = @MultiTokenPrediction, "
                             "MultiTokenPrediction.depth >= 1)")
        if restored.sharding is not None:
            raise ValueError("self-speculative decoding runs unsharded (the run binds "
                             "MESH_SHAPE)")
        graphdef = restored.graphdef
        self._prefill_fn = jax.jit(lambda *a: _prefill(graphdef, *a), static_argnums=(5,))
        self._step_fn = jax.jit(lambda *a: _step(graphdef, *a))
        self.last_speculative: SpeculativeStats | None = None

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling=generate_lib.GREEDY, seed: int = 0,
                 eos_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy new tokens of each prompt (as `Generator.generate` with greedy sampling)."""
        if sampling != generate_lib.GREEDY:
            raise ValueError("self-speculative decoding is greedy: sampling must be "
                             "SamplingConfig() (temperature 0)")
        rows, eos = self._check(prompts, max_new_tokens, sampling, seed, eos_ids)
        results, drafts, accepted = [], 0, 0
        for row in rows:
            tokens, row_drafts, row_accepted = self._one(row, max_new_tokens, eos)
            results.append(tokens)
            drafts, accepted = drafts + row_drafts, accepted + row_accepted
        self.last_speculative = SpeculativeStats(
            num_prompts=len(rows), new_tokens=sum(map(len, results)), drafts=drafts,
            accepted=accepted)
        return results

    def _one(self, row: list[int], max_new: int, eos: list[int]) -> tuple[list[int], int, int]:
        """One prompt: (new tokens, drafts verified, drafts accepted)."""
        _, prompt_len, max_len = generate_lib.buckets(1, len(row), max_new + 1)
        tokens = np.zeros((1, prompt_len), np.int32)
        tokens[0, prompt_len - len(row):] = row
        params, rest, state = self.restored.params, self.restored.rest, self.restored.router_state
        cache, mtp_cache, token, draft = self._prefill_fn(
            params, rest, state, jnp.asarray(tokens), jnp.int32(len(row)), max_len)
        out = [int(token)]
        cursor, drafts, accepted = prompt_len, 0, 0
        while len(out) < max_new and not set(out) & set(eos):
            cache, mtp_cache, a0, a1, ok, draft = self._step_fn(
                params, rest, state, cache, mtp_cache, token, draft, jnp.int32(cursor),
                jnp.int32(len(row)), jnp.int32(prompt_len))
            drafts += 1
            if bool(ok):
                accepted += 1
                out += [int(a0), int(a1)]
                token, cursor = a1, cursor + 2
            else:
                out.append(int(a0))
                token, cursor = a0, cursor + 1
        return generate_lib.until_eos(np.asarray(out[:max_new]), eos), drafts, accepted


def _valid(max_len: int, first: jax.Array, stop: jax.Array) -> jax.Array:
    """`[1, L] bool`: slots first .. stop - 1."""
    slots = jnp.arange(max_len, dtype=jnp.int32)[None]
    return (slots >= first) & (slots < stop)


def _mtp_decode(model, h: jax.Array, next_tokens: jax.Array, *, positions, cache, cache_index,
                kv_valid, prefill: bool = False):
    """Depth 1 of the MTP on new slots: h `[1, S, d]` final-normed main states, next_tokens
    `[1, S]` -> (greedy drafts `[1, S]`, the MTP cache)."""
    mod = model.mtp.module(1)
    x = mod.combine(h, model.embed(next_tokens))
    token_mask = jax.lax.dynamic_slice(kv_valid, (0, cache_index), next_tokens.shape)
    y, cache, _ = mod.block.decode(x, positions=positions, cache=cache, cache_index=cache_index,
                                   kv_valid=kv_valid, token_mask=token_mask, prefill=prefill)
    return jnp.argmax(model.head(mod.norm(y)), axis=-1).astype(jnp.int32), cache


def _prefill(graphdef, params, rest, router_state, tokens, length, max_len: int):
    """tokens `[1, P]` left-padded prompt of `length` -> (main cache, MTP cache, first
    token, draft of the token after it)."""
    model = nnx.merge(graphdef, params, rest)
    prompt_len = tokens.shape[1]
    first = prompt_len - length
    positions = jnp.maximum(jnp.arange(prompt_len, dtype=jnp.int32)[None] - first, 0)
    kv_valid = _valid(max_len, first, jnp.int32(prompt_len))
    x, cache, _ = model.decode_hidden(tokens, positions=positions,
                                      cache=model.init_cache(1, max_len),
                                      cache_index=jnp.int32(0), kv_valid=kv_valid,
                                      router_state=router_state, prefill=True)
    h = model.final_norm(x)
    token = jnp.argmax(model.head(h[:, -1:])[0, 0]).astype(jnp.int32)
    mtp_cache = model.mtp.module(1).block.attention.init_cache(1, max_len, model.dtype)
    next_tokens = jnp.concatenate([tokens[:, 1:], token[None, None]], axis=1)
    drafts, mtp_cache = _mtp_decode(model, h, next_tokens, positions=positions, cache=mtp_cache,
                                    cache_index=jnp.int32(0), kv_valid=kv_valid, prefill=True)
    return cache, mtp_cache, token, drafts[0, -1]


def _step(graphdef, params, rest, router_state, cache, mtp_cache, token, draft, cursor, length,
          prompt_len):
    """Verify `draft` after `token` (slots cursor, cursor + 1) -> (caches, a0, a1, accepted,
    next draft)."""
    model = nnx.merge(graphdef, params, rest)
    max_len = jax.tree.leaves(cache)[0].shape[1]
    first = prompt_len - length
    positions = (cursor - first + jnp.arange(2, dtype=jnp.int32))[None]
    kv_valid = _valid(max_len, first, cursor + 2)
    inputs = jnp.stack([token, draft])[None]
    x, cache, _ = model.decode_hidden(inputs, positions=positions, cache=cache,
                                      cache_index=cursor, kv_valid=kv_valid,
                                      router_state=router_state)
    h = model.final_norm(x)
    greedy = jnp.argmax(model.head(h), axis=-1).astype(jnp.int32)  # [1, 2]: a0, a1
    drafts, mtp_cache = _mtp_decode(model, h, greedy, positions=positions, cache=mtp_cache,
                                    cache_index=cursor, kv_valid=kv_valid)
    ok = greedy[0, 0] == draft
    return cache, mtp_cache, greedy[0, 0], greedy[0, 1], ok, jnp.where(ok, drafts[0, 1],
                                                                       drafts[0, 0])
