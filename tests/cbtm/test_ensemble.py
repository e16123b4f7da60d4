"""The c-BTM sparse ensemble (experiments.cbtm.ensemble, scripts/ensemble_eval.py) and
branching from a seed checkpoint (scripts/branch_checkpoint.py).

Unit scenarios on hand-made numbers (weights, mixtures, packed segments), then on the
tiny trained run the expert-surgery tests share (test_tiny.gin, 6 steps): one cluster
must give exactly the run's own validation loss, and a branch must resume the seed at
its step on its cluster's documents.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments.cbtm import ensemble
from experiments.cbtm.clusters import ClusterSpec, cluster_corpus, load_clustering
from tests.helpers import run_script, script_main


def test_weights_top_k_and_temperature():
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    x = np.array([[0.0, 0.0]])  # squared distances 0, 1, 9
    assert ensemble.ensemble_weights(x, centres, top_k=1, temperature=1.0).tolist() == [
        [1.0, 0.0, 0.0]]
    w = ensemble.ensemble_weights(x, centres, top_k=2, temperature=0.5)
    # softmax(-d/T) over the two nearest: e^0 / (e^0 + e^-2), e^-2 / (...), 0
    assert w[0] == pytest.approx([1 / (1 + math.e ** -2), math.e ** -2 / (1 + math.e ** -2), 0])
    with pytest.raises(ValueError, match=r"--top_k 4 must be in 1..3"):
        ensemble.ensemble_weights(x, centres, top_k=4, temperature=1.0)
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        ensemble.ensemble_weights(x, centres, top_k=1, temperature=0.0)


def test_mixture_of_branch_probabilities():
    lp = np.log(np.array([[0.5, 0.2], [0.1, 0.4]]))  # [k=2 branches, 2 tokens]
    w = np.array([[1.0, 0.0], [0.25, 0.75]])  # [tokens, k]
    # token 0: branch 0 alone -> 0.5; token 1: 0.25 * 0.2 + 0.75 * 0.4 = 0.35
    assert np.exp(ensemble.mixture_logprobs(lp, w)) == pytest.approx([0.5, 0.35])


def test_contexts_split_packed_segments_and_skip_the_prefix():
    # One row, two segments (3 and 2 tokens) then padding; prefix 2 tokens.
    batch = {"inputs": np.array([[104, 105, 33, 111, 107, 0]]),
             "segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
             "positions": np.array([[0, 1, 2, 0, 1, 0]]),
             "weights": np.array([[1, 1, 1, 1, 1, 0]], np.float32)}
    ctx = ensemble.contexts([batch], lambda ids: bytes(ids).decode(), prefix_tokens=2)
    assert ctx.texts == ["hi", "ok"]
    assert ctx.segment_of[0].tolist() == [[0, 0, 0, 1, 1, -1]]
    assert ctx.scored[0].tolist() == [[False, False, True, False, False, False]]


def test_one_cluster_ensemble_equals_the_single_model(seed_run, tiny_clusterings, tmp_path):
    out = tmp_path / "ens.json"
    code = script_main("ensemble_eval.py")([f"--clusters={tiny_clusterings / 'k1'}",
                                            f"--branch={seed_run}", "--prefix_tokens=0",
                                            f"--json={out}"])
    assert code == 0
    result = json.loads(out.read_text())
    summary = json.loads((seed_run / "summary.json").read_text())
    for domain in ("code", "prose", "all"):  # the trainer's evaluation of the same batches
        assert result["ensemble_loss"]["top1"][domain] == pytest.approx(
            summary["valid_loss"][domain], abs=2e-5)
        assert result["branch_loss"][0][domain] == result["ensemble_loss"]["top1"][domain]


def test_branch_resumes_the_seed_on_its_cluster(seed_run, tiny_clusterings, tmp_path, capsys):
    branch = tmp_path / "branch0"
    assert script_main("branch_checkpoint.py")([f"--seed_workdir={seed_run}",
                                                f"--out_workdir={branch}"]) == 0
    assert json.loads((branch / "branch.json").read_text())["step"] == 6
    k2 = tiny_clusterings / "k2"
    result = run_script("scripts/train.py", f"--workdir={branch}", "--quiet",
                        f"--gin_param=DataConfig.source = 'cluster:{k2}:0'",
                        "--gin_param=train.num_steps = 7")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((branch / "summary.json").read_text())
    assert summary["step"] == 7 and summary["steps_this_run"] == 1
    clustering = load_clustering(k2)
    table = clustering.meta["agreement"]["train"]["documents_per_domain_and_cluster"]
    domains_in_cluster = {d for d, per_cluster in table.items() if per_cluster[0]}
    assert set(summary["train_loss"]) - {"all"} <= domains_in_cluster
    # The same branch twice is not a 2-cluster ensemble: branch #1 must be cluster 1's.
    code = script_main("ensemble_eval.py")([f"--clusters={k2}", f"--branch={branch}",
                                            f"--branch={branch}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--branch #1 trained on" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--top_k=3"], "--top_k 3 must be in 1..1"),
    (["--prefix_tokens=-1"], "--prefix_tokens must be >= 0"),
    (["--branch={run}"], "--branch given 2 workdirs, --clusters"),
    (["--clusters={root}/none"], "no such clustering directory"),
])
def test_bad_input_exits_2_with_one_line(seed_run, tiny_clusterings, capsys, args, message):
    argv = [f"--clusters={tiny_clusterings / 'k1'}", f"--branch={seed_run}",
            *(a.format(run=seed_run, root=tiny_clusterings) for a in args)]
    code = script_main("ensemble_eval.py")(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_hidden_state_clustering_is_deterministic_and_refuses_bad_flags(seed_run, tmp_path):
    # The paper's other featuriser: the run's mean final hidden state (d_model = 32).
    spec = ClusterSpec(num_clusters=2, max_bytes_per_domain=300000,
                       features=f"hidden:{seed_run}", hidden_tokens=16)
    meta = cluster_corpus(spec, tmp_path / "a")
    cluster_corpus(spec, tmp_path / "b")
    assert meta["features_file"] == "hidden.json" and meta["feature_dims"] == 32
    for name in ("assignment.jsonl", "centres.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert load_clustering(tmp_path / "a").features.transform(["x = 1"]).shape == (1, 32)
    with pytest.raises(ValueError, match="--features must be 'tfidf' or 'hidden:<workdir>'"):
        ClusterSpec(features="bert")
    with pytest.raises(FileNotFoundError, match="--features 'hidden:.*': no checkpoints/"):
        cluster_corpus(ClusterSpec(features=f"hidden:{tmp_path}"), tmp_path / "c")
