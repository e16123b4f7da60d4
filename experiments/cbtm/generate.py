"""Generation from the c-BTM sparse ensemble (`scripts/ensemble_generate.py`; docs/cbtm.md).

The next-token distribution is the mixture of the branches' distributions,

    p(x_t | x_<t) = Σ_j w_j(x_<t) p_j(x_t | x_<t),

with the weights of `experiments.cbtm.ensemble.ensemble_weights` (top-k distance
softmax) computed from the features of the **whole context so far** (the prompt and
the tokens generated before t, decoded to text): they are recomputed at every token,
as c-BTM's p(j | x_<t) is (its reference scorer recomputes them from every prefix).

Every branch keeps its own KV cache and decodes every token (a branch outside the
top-k now may be in it later, and its cache must follow the text); per token each
branch runs one step of `experiments.inference.generate`'s decode (`prefill_logits`,
`decode_logits`; the same buckets, padding and RNG schedule as `Generator`), then the
host computes the weights and mixes. When one weight is 1 (top_k = 1, or one
cluster) the branch's logits are used as they are, so the tokens are exactly that
branch's `scripts/generate.py` output; otherwise the mixture's log-probabilities,
log Σ_j w_j softmax(z_j), are what `sampling.sample` draws from (greedy: argmax).
One prompt per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.cbtm import ensemble
from experiments.inference import generate as generate_lib
from experiments.inference.restore import RestoredModel
from experiments.inference.sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class EnsembleOutput:
    """ids: the new tokens (up to and including an EOS id); weights `[len(ids), k]`:
    the branch weights each new token was drawn with."""

    ids: list[int]
    weights: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Programs:
    """One branch's compiled prefill and decode step for a (B, P, L) bucket."""

    prefill: Any
    step: Any


def _compile(restored: RestoredModel, batch: int, prompt_len: int, max_len: int) -> _Programs:
    graphdef, params, rest = restored.graphdef, restored.params, restored.rest
    state = restored.router_state
    rows = lambda dtype, *shape: jax.ShapeDtypeStruct(
        (batch, *shape), dtype, sharding=None if restored.sharding is None
        else restored.sharding.batch_sharding(1 + len(shape)))
    with restored.context():
        prefill = jax.jit(lambda p, r, s, t, n, real: generate_lib.prefill_logits(
            graphdef, max_len, p, r, s, t, n, real)).lower(
                params, rest, state, rows(jnp.int32, prompt_len), rows(jnp.int32),
                rows(bool)).compile()
        cache = jax.tree.map(lambda a: rows(a.dtype, *a.shape[1:]), jax.eval_shape(
            lambda: nnx.merge(graphdef, params, rest).init_cache(batch, max_len)))

        def step(p, r, s, cache, token, n, real, start, i):
            return generate_lib.decode_logits(nnx.merge(graphdef, p, r), s, cache, token, n,
                                              real, start, i)

        donate = () if jax.default_backend() == "cpu" else (3,)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        step = jax.jit(step, donate_argnums=donate).lower(
            params, rest, state, cache, rows(jnp.int32), rows(jnp.int32), rows(bool), scalar,
            scalar).compile()
    return _Programs(prefill, step)


class _Branch:
    """One branch decoding one prompt: its programs, inputs and KV cache."""

    def __init__(self, restored: RestoredModel, programs: Callable[..., _Programs],
                 prompt: Sequence[int], max_new_tokens: int):
        self.restored = restored
        batch, prompt_len, max_len = generate_lib.buckets(1, len(prompt), max_new_tokens,
                                                          restored.batch_shards)
        self.programs = programs(restored, batch, prompt_len, max_len)
        tokens = np.zeros((batch, prompt_len), np.int32)
        tokens[0, prompt_len - len(prompt):] = prompt
        self.batch, self.start = batch, prompt_len
        self.inputs = (tokens, np.array([len(prompt)] + [0] * (batch - 1), np.int32),
                       np.arange(batch) < 1)
        self.cache: Any = None

    def _put(self, array: np.ndarray) -> jax.Array:
        sharding = self.restored.sharding
        if sharding is None:
            return jnp.asarray(array)
        return jax.device_put(array, sharding.batch_sharding(array.ndim))

    def prefill(self) -> jax.Array:
        """-> logits `[V]` of new token 0 (row 0)."""
        r = self.restored
        with r.context():
            self.cache, logits = self.programs.prefill(r.params, r.rest, r.router_state,
                                                       *map(self._put, self.inputs))
        return logits[0]

    def step(self, token: int, i: int) -> jax.Array:
        """Feeds new token i - 1 -> logits `[V]` of new token i."""
        r = self.restored
        with r.context():
            logits, self.cache = self.programs.step(
                r.params, r.rest, r.router_state, self.cache,
                self._put(np.full(self.batch, token, np.int32)),
                *map(self._put, self.inputs[1:]), jnp.int32(self.start), jnp.int32(i))
        return logits[0]


def mixture_logits(logits: Sequence[jax.Array], weights: np.ndarray) -> jax.Array:
    """`[V]` what is sampled from: the branch's logits when one weight is 1, else
    log Σ_j w_j softmax(logits_j) (float32) over the branches with w_j > 0."""
    active = [j for j in range(len(logits)) if weights[j] > 0]
    if len(active) == 1:
        return logits[active[0]]
    stacked = jnp.stack([jax.nn.log_softmax(logits[j].astype(jnp.float32)) for j in active])
    log_w = jnp.log(jnp.asarray(weights[active], jnp.float32))[:, None]
    return jax.nn.logsumexp(stacked + log_w, axis=0)


class EnsembleGenerator:
    """Generates from restored branches (all causal, one vocabulary).

    features(texts) -> `[N, D]` (the clustering's featuriser), centres `[k, D]`
    (branch j = cluster j), decode(ids) -> text (the branches' tokenizer).
    """

    def __init__(self, branches: Sequence[RestoredModel], features: Callable[[list[str]], Any],
                 centres: np.ndarray, decode: Callable[[list[int]], str], *, top_k: int,
                 temperature: float):
        if len(branches) != centres.shape[0]:
            raise ValueError(f"--branch given {len(branches)} models for {centres.shape[0]} "
                             "clusters: give one branch per cluster, in cluster order")
        vocab = {b.vocab_size for b in branches}
        if len(vocab) != 1:
            raise ValueError(f"--branch models have different vocabulary sizes {sorted(vocab)}: "
                             "the ensemble mixes distributions over one vocabulary")
        ensemble.ensemble_weights(np.zeros((1, centres.shape[1])), centres, top_k=top_k,
                                  temperature=temperature)  # checks top_k and temperature
        self.branches, self.features, self.centres = list(branches), features, centres
        self.decode, self.top_k, self.temperature = decode, top_k, temperature
        self.vocab_size = vocab.pop()
        self._compiled: dict[tuple[int, int, int, int], _Programs] = {}

    def _programs(self, restored: RestoredModel, batch: int, prompt_len: int,
                  max_len: int) -> _Programs:
        """Compiled once per branch model and bucket (a model given twice compiles once)."""
        key = (id(restored), batch, prompt_len, max_len)
        if key not in self._compiled:
            self._compiled[key] = _compile(restored, batch, prompt_len, max_len)
        return self._compiled[key]

    def weights(self, ids: Sequence[int]) -> np.ndarray:
        """`[k]` the weights of the context `ids` (decoded to text, featurised)."""
        feats = np.asarray(self.features([self.decode(list(ids))]), np.float64)
        return ensemble.ensemble_weights(feats, self.centres, top_k=self.top_k,
                                         temperature=self.temperature)[0]

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int,
                 sampling: SamplingConfig = generate_lib.GREEDY, seed: int = 0,
                 eos_ids: Sequence[int] = ()) -> EnsembleOutput:
        """max_new_tokens new tokens, or fewer when an EOS id comes first (included)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty; it needs at least one token")
        bad = [t for t in [*prompt, *eos_ids] if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        programs = [_Branch(b, self._programs, prompt, max_new_tokens) for b in self.branches]
        rng = jax.random.PRNGKey(seed)
        ids: list[int] = []
        history: list[np.ndarray] = []
        logits = [p.prefill() for p in programs]
        for i in range(max_new_tokens):
            if i:
                logits = [p.step(ids[-1], i) for p in programs]
            w = self.weights(prompt + ids)
            mixed = mixture_logits(logits, w)
            token = int(sample(mixed[None], jax.random.fold_in(rng, i), sampling)[0])
            ids.append(token)
            history.append(w)
            if token in eos_ids:
                break
        return EnsembleOutput(ids=ids, weights=np.stack(history))
