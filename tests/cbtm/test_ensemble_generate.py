"""Generation from the c-BTM ensemble (experiments/cbtm/generate.py,
scripts/ensemble_generate.py) on the tiny trained run and clusterings that
tests/cbtm/conftest.py shares (test_tiny.gin, 6 steps; k = 1 and k = 2).

One cluster: the weight is 1, so the greedy tokens must be scripts/generate.py's on
that run, token for token. Two identical branches with top_k = 2 (both weights > 0,
so the log-space mixture path is taken): the mixture of a distribution with itself
is that distribution, so the tokens equal the single run's again. Bad flags exit 2
with one line naming the flag.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from experiments.cbtm.clusters import load_clustering
from experiments.cbtm.generate import EnsembleGenerator, mixture_logits
from experiments.inference.restore import restore_model
from experiments.inference.tokenizer import workdir_tokenizer
from tests.helpers import script_main

PROMPT = "def main("
N = 6


def test_mixture_of_one_branch_is_its_logits_and_of_equal_weights_the_log_mean():
    a, b = np.array([2.0, 0.0, -1.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    assert mixture_logits([a, b], np.array([1.0, 0.0])) is a  # untouched: bitwise
    soft = lambda z: np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(np.asarray(mixture_logits([a, b], np.array([0.25, 0.75]))),
                               np.log(0.25 * soft(a) + 0.75 * soft(b)), rtol=1e-6)


@pytest.fixture(scope="module")
def generate_py(seed_run):
    """scripts/generate.py's greedy JSON record for PROMPT on the run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert script_main("generate.py")([f"--workdir={seed_run}", f"--prompt={PROMPT}",
                                           f"--max_new_tokens={N}", "--eos_ids=none",
                                           "--json"]) == 0
    record = json.loads(out.getvalue())
    assert len(record["ids"]) == N
    return record


def test_one_cluster_greedy_equals_generate_py(seed_run, tiny_clusterings, generate_py, capsys):
    assert script_main("ensemble_generate.py")([
        f"--clusters={tiny_clusterings / 'k1'}", f"--branch={seed_run}", f"--prompt={PROMPT}",
        f"--max_new_tokens={N}", "--eos_ids=none", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ids"] == generate_py["ids"] and got["text"] == generate_py["text"]
    assert got["prompt_ids"] == generate_py["prompt_ids"] and got["weights"] == [[1.0]] * N


def test_two_identical_branches_generate_as_either(seed_run, tiny_clusterings, generate_py):
    clustering = load_clustering(tiny_clusterings / "k2")
    restored = restore_model(seed_run)
    tokenizer = workdir_tokenizer(seed_run)
    pair = EnsembleGenerator([restored, restored], clustering.features.transform,
                             clustering.centres, tokenizer.decode, top_k=2, temperature=10.0)
    out = pair.generate(generate_py["prompt_ids"], max_new_tokens=N)
    assert out.ids == generate_py["ids"]
    assert out.weights.shape == (N, 2) and np.all(out.weights > 0)  # the mixture path ran
    np.testing.assert_allclose(out.weights.sum(1), 1.0)


@pytest.mark.parametrize("args, message", [
    (["--top_k=2"], "--top_k 2 must be in 1..1"),
    (["--temperature=0"], "--temperature must be > 0"),
    (["--branch={run}"], "--branch given 2 workdirs, --clusters"),
    (["--sampling=beam"], "--sampling must be one of ('greedy', 'sample'), got 'beam'"),
    (["--seed=3"], "--seed needs --sampling=sample"),
    (["--sampling=sample", "--sample_top_k=0"], "--sample_top_k must be an int >= 1"),
    (["--sampling=sample", "--sample_temperature=0"], "--sample_temperature must be > 0"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--clusters={root}/none"], "no such clustering directory"),
])
def test_bad_input_exits_2_with_one_line(seed_run, tiny_clusterings, capsys, args,
                                         message):
    argv = [f"--clusters={tiny_clusterings / 'k1'}", f"--branch={seed_run}", "--prompt=x",
            "--max_new_tokens=2", *(a.format(run=seed_run, root=tiny_clusterings) for a in args)]
    code = script_main("ensemble_generate.py")(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
