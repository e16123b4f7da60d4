"""scripts/score.py on a tiny trained run: its log-probabilities are the model's
own log_softmax, they sum to minus the model's cross-entropy, MoE layers score
dropless and the loss-free selection biases are applied."""

from __future__ import annotations

import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.data.config import DataConfig
from experiments.inference import score as score_lib
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train import trainer  # noqa: F401  (registers the run's configurables)
from experiments.train.train_step import token_cross_entropy
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from moe.router_state import SELECTION_BIAS, RouterState
from tests.helpers import run_script, shared_training_run

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
# A capacity factor that drops tokens at eval time, and loss-free balancing.
PARAMS = ("train.num_steps = 6", "LossFreeBalancing.enabled = True",
          "LossFreeBalancing.rate = 0.05", "MoeLayer.capacity_factor = 0.5")
TEXT = "The quick brown fox jumps over the lazy dog."
IDS = [1, *(b + 3 for b in TEXT.encode())]  # ByteTokenizer: BOS, bytes shifted by 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "score_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]


def _forward(workdir, *, dropless: bool, biases: bool):
    """logits `[n, V]` and aux of the run's model on IDS, restored in this test."""
    gin.clear_config()
    gin_utils.parse([str(workdir / gin_utils.CONFIG_FILE)], [])
    model = TransformerLM(vocab_size=DataConfig().vocab_size(), rngs=nnx.Rngs(0))
    gin.clear_config()
    if dropless:
        for _, m in nnx.iter_modules(model):
            if isinstance(m, MoeLayer):
                m.eval_capacity_factor = None
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    restored = checkpointer.restore_latest(jax.eval_shape(lambda: params.to_pure_dict()), None)
    checkpointer.close()
    state = restored.balance_state
    assert state and any(np.abs(v).max() > 0 for v in state.values())
    router_state = RouterState(layers={k: {SELECTION_BIAS: jnp.asarray(v)}
                                       for k, v in state.items()}) if biases else None
    model = nnx.merge(graphdef, restored.params, rest)
    logits, aux = model(jnp.asarray([IDS]), deterministic=True, router_state=router_state)
    return logits[0], aux


def _score_json(workdir, *args):
    result = run_script("scripts/score.py", f"--workdir={workdir}", "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_logprobs_are_the_models_log_softmax(workdir):
    out = _score_json(workdir, "--ids=" + ",".join(map(str, IDS)))
    logits, aux = _forward(workdir, dropless=True, biases=True)
    want = np.asarray(jax.nn.log_softmax(logits[:-1]))[np.arange(len(IDS) - 1), IDS[1:]]
    assert out["ids"] == IDS
    np.testing.assert_allclose(out["logprobs"], want, atol=1e-5)
    ce = np.asarray(token_cross_entropy(logits[None, :-1], jnp.asarray([IDS[1:]])))
    np.testing.assert_allclose(out["total"], -ce.sum(), rtol=1e-5)
    assert all(float(a.dropped_fraction) == 0 for a in aux.values())
    # The features matter here: with the run's capacity, or without the biases,
    # the log-probabilities differ.
    capped, capped_aux = _forward(workdir, dropless=False, biases=True)
    assert max(float(a.dropped_fraction) for a in capped_aux.values()) > 0
    unbiased, _ = _forward(workdir, dropless=True, biases=False)
    for other in (capped, unbiased):
        got = np.asarray(jax.nn.log_softmax(other[:-1]))[np.arange(len(IDS) - 1), IDS[1:]]
        assert np.abs(got - want).max() > 1e-4


def test_routing_is_the_scored_forwards_token_experts(workdir):
    """`Scorer.routing`: per MoE layer the experts of each token, selection biases applied."""
    routing = score_lib.load_scorer(workdir).routing(jnp.asarray([IDS]))
    _, aux = _forward(workdir, dropless=True, biases=True)
    _, unbiased = _forward(workdir, dropless=True, biases=False)
    assert set(routing) == set(aux) and aux
    for name, experts in routing.items():
        assert experts.shape[0] == len(IDS)
        np.testing.assert_array_equal(experts, aux[name].token_experts, err_msg=name)
    assert any(np.any(np.asarray(routing[n]) != np.asarray(unbiased[n].token_experts))
               for n in routing)


def test_text_uses_the_workdirs_tokenizer(workdir):
    by_text = _score_json(workdir, "--text=" + TEXT)
    by_ids = _score_json(workdir, "--ids=" + ",".join(map(str, IDS[1:])))
    assert by_text == by_ids


@pytest.mark.parametrize("ids", [[5], [], [1, 259]])
def test_check_ids_refuses(ids):
    with pytest.raises(ValueError, match="at least 2 tokens|outside the vocabulary"):
        score_lib.check_ids(ids, 259)


def test_cli_refuses_an_id_outside_the_vocabulary(workdir):
    result = run_script("scripts/score.py", f"--workdir={workdir}", "--ids=1,72,259")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: token id 259 is outside the vocabulary [0, 259)"]


def test_score_batch_equals_score_one_sequence_at_a_time(workdir):
    """Padded batches (right padding, segment 0, one compile per length bucket) give each
    sequence's own log-probs and argmax flags, in the input order, on the MoE run
    (selection biases, dropless). Lengths span three buckets; 5 sequences in rows of 2,
    so batches hold padding rows as well as padded positions."""
    scorer = score_lib.load_scorer(workdir)
    sequences = [IDS, IDS[:2], IDS[5:25], IDS[::-1], IDS[3:9]]
    assert {score_lib.length_bucket(len(s) - 1) for s in sequences} == {16, 32, 64}
    batched = score_lib.score_batch(scorer, sequences, batch_size=2)
    for ids, got in zip(sequences, batched):
        want = score_lib.score(scorer, ids)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        logits = np.asarray(scorer.forward(jnp.asarray([ids])))[0, :-1]
        np.testing.assert_array_equal(got.greedy, logits.argmax(-1) == np.asarray(ids[1:]))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_lib.score_batch(scorer, sequences, batch_size=0)
