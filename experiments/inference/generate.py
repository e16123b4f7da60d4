"""Text generation with a KV cache: prefill the prompts, then decode token by token.

    generator = load_generator(workdir)
    new_ids = generator.generate([[1, 72, 101], [1, 87]], max_new_tokens=16,
                                 sampling=SamplingConfig(temperature=0.8, top_p=0.9),
                                 seed=0, eos_ids=[2])

Buckets (so that a handful of programs serve every request): the batch is
padded to B = the next power of two >= the number of prompts (then to a
multiple of the mesh's batch shards), the prompts to P = the next power of two
>= the longest prompt (at least 8), and the cache has L = the next power of two
>= P + max_new_tokens slots (at least 16). The prefill program is compiled once
per (B, P, L) and the decode program once per (B, L) (and per sampling config
and number of EOS ids, which are static); compilation is ahead of time and
timed apart from the run (`Generator.last_stats`).

Padding: prompts are left-padded to P, so the last prompt token of every row
sits in slot P-1 and generated tokens follow in slots P, P+1, ...; a row's
RoPE positions count its real tokens from 0, and `kv_valid [B, L]` marks the
slots holding real tokens, so pads are never attended to and are masked out
of MoE routing (`TransformerLM.decode`). Batch pad rows have no real token and
are finished from the start.

Decode loop: one `lax.while_loop` in one compiled program (prefill is a
second one): each iteration feeds the previous token (S = 1; the prompt is
never recomputed), samples the next one and marks rows that emitted an EOS id
as done; the loop stops when every row is done or max_new_tokens tokens were
produced. A host-side Python loop would cost a dispatch and a device-to-host
sync per token to test for EOS; the while_loop tests it on the device.

Sampling: step i of row b draws with `fold_in(fold_in(PRNGKey(seed), i), b)`
(`sampling.sample`), so the same prompts (in the same order), seed and config
give the same tokens, whatever the batch bucket.

MoE layers run their training call, dropless (`restore.make_dropless`), with
the checkpoint's selection biases. Under a run's mesh (config binds
MESH_SHAPE), both programs trace in the run's sharding context with the
parameters placed as in training and the batch split over the batch axes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.inference import restore as restore_lib
from experiments.inference.sampling import SamplingConfig, sample
from moe import sharding as sharding_lib

MIN_PROMPT_BUCKET, MIN_LENGTH_BUCKET = 8, 16
GREEDY = SamplingConfig()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def buckets(num_prompts: int, longest_prompt: int, max_new_tokens: int,
            batch_shards: int = 1) -> tuple[int, int, int]:
    """(B, P, L): batch, prompt and cache-length buckets (module doc)."""
    batch = _pow2(num_prompts)
    batch = -(-batch // batch_shards) * batch_shards
    prompt = max(MIN_PROMPT_BUCKET, _pow2(longest_prompt))
    return batch, prompt, max(MIN_LENGTH_BUCKET, _pow2(prompt + max_new_tokens))


@dataclasses.dataclass
class GenerateStats:
    """What the last `generate` call did. Seconds exclude compilation (ahead of
    time, in `compile_seconds`); device work is waited for before each clock read.

    decode_steps: decode-loop iterations run (each feeds one token per row;
    the first new token comes from the prefill).
    """

    num_prompts: int
    batch_bucket: int
    prompt_bucket: int
    length_bucket: int
    prompt_tokens: int
    new_tokens: int
    decode_steps: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    compiled_buckets: list[tuple[str, tuple[int, ...]]]

    @property
    def seconds_per_decode_step(self) -> float:
        return self.decode_seconds / max(self.decode_steps, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds_per_decode_step":
                self.seconds_per_decode_step}


class Generator:
    """Generates from a `restore.RestoredModel` (see the module doc)."""

    def __init__(self, restored: restore_lib.RestoredModel):
        self.restored = restored
        self.last_stats: GenerateStats | None = None
        self._programs: dict[tuple, Any] = {}
        self._compile_seconds = 0.0

    @property
    def vocab_size(self) -> int:
        return self.restored.vocab_size

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingConfig = GREEDY, seed: int = 0,
                 eos_ids: Sequence[int] = ()) -> list[list[int]]:
        """The new tokens of each prompt: max_new_tokens of them, or fewer when an
        EOS id comes first (it is included, nothing after it)."""
        rows, eos = self._check(prompts, max_new_tokens, sampling, seed, eos_ids)
        n = len(rows)
        batch, prompt_len, max_len = buckets(n, max(map(len, rows)), max_new_tokens,
                                             self.restored.batch_shards)
        tokens = np.zeros((batch, prompt_len), np.int32)
        lengths = np.zeros((batch,), np.int32)
        for i, row in enumerate(rows):
            tokens[i, prompt_len - len(row):] = row
            lengths[i] = len(row)
        real = np.arange(batch) < n
        self._compile_seconds = 0.0
        prefill = self._program("prefill", batch, prompt_len, max_len, sampling, 0)
        decode = self._program("decode", batch, 0, max_len, sampling, len(eos))
        rng = jax.random.PRNGKey(seed)
        put = self._put
        params, rest = self.restored.params, self.restored.rest
        state = self.restored.router_state
        start = time.perf_counter()
        with self.restored.context():
            cache, first = prefill(params, rest, state, put(tokens), put(lengths), put(real), rng)
            jax.block_until_ready(first)
            prefilled = time.perf_counter()
            out, steps = decode(params, rest, state, cache, first, put(lengths), put(real),
                                jnp.int32(prompt_len), jnp.int32(max_new_tokens),
                                jnp.asarray(eos, jnp.int32), rng)
            out, steps = np.asarray(out), int(steps)
        done = time.perf_counter()
        results = [until_eos(out[i, :max_new_tokens], eos) for i in range(n)]
        self.last_stats = GenerateStats(
            num_prompts=n, batch_bucket=batch, prompt_bucket=prompt_len, length_bucket=max_len,
            prompt_tokens=int(lengths.sum()), new_tokens=sum(map(len, results)),
            decode_steps=steps, prefill_seconds=prefilled - start,
            decode_seconds=done - prefilled, compile_seconds=self._compile_seconds,
            compiled_buckets=sorted((k[0], k[1:4]) for k in self._programs))
        return results

    def _check(self, prompts, max_new_tokens, sampling, seed,
               eos_ids) -> tuple[list[list[int]], list[int]]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        rows = [list(map(int, p)) for p in prompts]
        if not rows:
            raise ValueError("prompts must hold at least one prompt")
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        eos = [int(t) for t in eos_ids]
        bad = [t for t in eos if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"eos id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return rows, eos

    def _put(self, array: np.ndarray) -> jax.Array:
        """A `[B, ...]` host array, split over the batch axes under a mesh."""
        sharding = self.restored.sharding
        if sharding is None:
            return jnp.asarray(array)
        return jax.device_put(array, sharding.batch_sharding(array.ndim))

    def _program(self, kind: str, batch: int, prompt_len: int, max_len: int,
                 sampling: SamplingConfig, num_eos: int):
        """The compiled prefill or decode program of this bucket (compiled once, timed)."""
        key = (kind, batch, prompt_len, max_len, sampling, num_eos)
        if key not in self._programs:
            started = time.perf_counter()
            self._programs[key] = self._compile(kind, batch, prompt_len, max_len, sampling,
                                                num_eos)
            self._compile_seconds += time.perf_counter() - started
        return self._programs[key]

    def _compile(self, kind, batch, prompt_len, max_len, sampling, num_eos):
        graphdef = self.restored.graphdef
        spec = jax.ShapeDtypeStruct
        rows = lambda dtype, *shape: self._abstract((batch, *shape), dtype)
        rng = jax.random.PRNGKey(0)
        params, rest = self.restored.params, self.restored.rest
        state = self.restored.router_state
        # Under a mesh, the cache and the token vectors are split over the batch axes
        # on their first dimension: the prefill's outputs are the decode's inputs.
        cache = jax.tree.map(lambda a: self._abstract(a.shape, a.dtype), jax.eval_shape(
            lambda: nnx.merge(graphdef, params, rest).init_cache(batch, max_len)))
        with self.restored.context():
            if kind == "prefill":
                out_shardings = (None if self.restored.sharding is None else
                                 jax.tree.map(lambda a: a.sharding, (cache, rows(jnp.int32))))
                fn = jax.jit(lambda *a: _prefill(graphdef, max_len, sampling, *a),
                             out_shardings=out_shardings)
                lowered = fn.lower(params, rest, state, rows(jnp.int32, prompt_len),
                                   rows(jnp.int32), rows(bool), rng)
            else:
                donate = () if jax.default_backend() == "cpu" else (3,)
                fn = jax.jit(lambda *a: _decode(graphdef, sampling, *a), donate_argnums=donate)
                lowered = fn.lower(params, rest, state, cache, rows(jnp.int32), rows(jnp.int32),
                                   rows(bool), spec((), jnp.int32), spec((), jnp.int32),
                                   spec((num_eos,), jnp.int32), rng)
            return lowered.compile()

    def _abstract(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        sharding = self.restored.sharding
        return jax.ShapeDtypeStruct(shape, dtype, sharding=None if sharding is None
                                    else sharding.batch_sharding(len(shape)))


def kv_valid_mask(lengths: jax.Array, real: jax.Array, start: jax.Array, stop: jax.Array,
                  max_len: int) -> jax.Array:
    """`[B, L] bool`: slots start - lengths[b] .. stop - 1 of real rows."""
    slots = jnp.arange(max_len, dtype=jnp.int32)[None]
    return (slots >= (start - lengths)[:, None]) & (slots < stop) & real[:, None]


def prefill_logits(graphdef, max_len: int, params, rest, router_state, tokens: jax.Array,
                   lengths: jax.Array, real: jax.Array) -> tuple[Any, jax.Array]:
    """tokens `[B, P] int32` (left-padded), lengths `[B]`, real `[B] bool` ->
    (cache with slots 0..P-1 written, next-token logits `[B, V]` after the prompt)."""
    model = nnx.merge(graphdef, params, rest)
    batch, prompt_len = tokens.shape
    positions = jnp.maximum(jnp.arange(prompt_len, dtype=jnp.int32)[None]
                            - (prompt_len - lengths)[:, None], 0)
    # Every cache leaf is [B, L, ...] whatever the attention kind (`TransformerLM.init_cache`).
    cache = jax.tree.map(lambda c: sharding_lib.constrain(c, (sharding_lib.BATCH,)
                                                          + (None,) * (c.ndim - 1)),
                         model.init_cache(batch, max_len))
    kv_valid = kv_valid_mask(lengths, real, jnp.int32(prompt_len), jnp.int32(prompt_len),
                             max_len)
    logits, cache, _ = model.decode(tokens, positions=positions, cache=cache,
                                    cache_index=jnp.int32(0), kv_valid=kv_valid,
                                    router_state=router_state, prefill=True,
                                    last_only=True)
    return cache, logits[:, -1]


def decode_logits(model, router_state, cache, token: jax.Array, lengths: jax.Array,
                  real: jax.Array, start: jax.Array, i: jax.Array) -> tuple[jax.Array, Any]:
    """Decode step i >= 1: feeds new token i - 1 (`[B] int32`, cache slot start + i - 1)
    -> (logits `[B, V]` of new token i, the cache)."""
    max_len = jax.tree.leaves(cache)[0].shape[1]
    slot = start + i - 1
    kv_valid = kv_valid_mask(lengths, real, start, slot + 1, max_len)
    logits, cache, _ = model.decode(token[:, None], positions=(lengths + i - 1)[:, None],
                                    cache=cache, cache_index=slot, kv_valid=kv_valid,
                                    router_state=router_state)
    return logits[:, 0], cache


def _prefill(graphdef, max_len: int, sampling: SamplingConfig, params, rest, router_state,
             tokens: jax.Array,
             lengths: jax.Array, real: jax.Array, rng: jax.Array):
    """`prefill_logits`, then the first new token `[B] int32` sampled:
    -> (cache with slots 0..P-1 written, first new token)."""
    cache, logits = prefill_logits(graphdef, max_len, params, rest, router_state, tokens,
                                   lengths, real)
    return cache, sample(logits, jax.random.fold_in(rng, 0), sampling)


def _decode(graphdef, sampling: SamplingConfig, params, rest, router_state, cache,
            first: jax.Array,
            lengths: jax.Array, real: jax.Array, start: jax.Array, max_new: jax.Array,
            eos: jax.Array, rng: jax.Array):
    """Decode loop from the prefilled cache; -> (tokens `[B, L] int32`: new token i
    in column i, columns past the loop's end 0; decode steps run)."""
    model = nnx.merge(graphdef, params, rest)
    batch = first.shape[0]
    max_len = jax.tree.leaves(cache)[0].shape[1]
    is_eos = lambda t: jnp.any(t[:, None] == eos[None, :], axis=-1)
    out = jnp.zeros((batch, max_len), jnp.int32).at[:, 0].set(first)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out = carry
        logits, cache = decode_logits(model, router_state, cache, token, lengths, real, start, i)
        token = sample(logits, jax.random.fold_in(rng, i), sampling)
        return i + 1, token, cache, done | is_eos(token), out.at[:, i].set(token)

    carry = (jnp.int32(1), first, cache, ~real | is_eos(first), out)
    i, _, _, _, out = jax.lax.while_loop(cond, body, carry)
    return out, i - 1


def until_eos(tokens: np.ndarray, eos: Sequence[int]) -> list[int]:
    out = []
    for token in tokens.tolist():
        out.append(int(token))
        if token in eos:
            break
    return out


def load_generator(workdir: str | Path, step: int | None = None) -> Generator:
    """`Generator(restore.restore_model(workdir, step))`."""
    return Generator(restore_lib.restore_model(workdir, step))
