"""c-BTM clustering (experiments.cbtm, scripts/cluster_corpus.py) on hand-made inputs.

The corpus: a JSONL source of 24 short documents, 12 about fruit (domain `prose`) and
12 Python-like lines (domain `code`), whose vocabularies do not overlap: two balanced
clusters must recover the domains exactly (AMI 1, purity 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.cbtm import kmeans
from experiments.cbtm.clusters import ClusterSpec, cluster_corpus, load_clustering
from experiments.cbtm.features import fit_tfidf
from experiments.data.sources import load_source_split
from tests.helpers import script_main

FRUIT = ["apple banana cherry", "banana mango apple", "cherry plum apple", "mango plum banana"]
CODE = ["import os return value", "def value return self", "import sys def main",
        "return self value import"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cbtm") / "docs.jsonl"
    rows = [{"text": f"{FRUIT[i % 4]} {FRUIT[(i + 1) % 4]}", "domain": "prose"}
            for i in range(12)]
    rows += [{"text": f"{CODE[i % 4]} {CODE[(i + 2) % 4]}", "domain": "code"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def clustered(corpus_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cbtm_out") / "k2"
    spec = ClusterSpec(source=f"jsonl:{corpus_file}", num_clusters=2, seed=0, svd_dims=4,
                       validation_fraction=0.25)
    return out, cluster_corpus(spec, out)


def test_balanced_assign_caps_sizes_and_prefers_the_nearest_cluster():
    # Docs 0-2 are all nearest to cluster 0; only floor(5/2)+1 = 3 fit in one cluster,
    # so doc 3 (also nearest to 0, but farther than docs 0-2) goes to cluster 1.
    d = np.array([[0.0, 5.0], [0.1, 5.0], [0.2, 5.0], [0.3, 0.4], [9.0, 0.0]])
    assert kmeans.balanced_assign(d).tolist() == [0, 0, 0, 1, 1]
    # 4 docs into 3 clusters: sizes 2, 1, 1 even though all prefer cluster 0.
    sizes = np.bincount(kmeans.balanced_assign(np.tile([0.0, 1.0, 2.0], (4, 1))), minlength=3)
    assert sorted(sizes.tolist()) == [1, 1, 2]


def test_agreement_metrics_on_hand_tables():
    perfect = kmeans.contingency([0, 0, 1, 1], [1, 1, 0, 0], 2, 2)
    assert kmeans.adjusted_mutual_information(perfect) == pytest.approx(1.0)
    assert kmeans.purity(perfect) == 1.0
    mixed = kmeans.contingency([0, 0, 1, 1], [0, 1, 0, 1], 2, 2)  # independent
    assert kmeans.adjusted_mutual_information(mixed) < 0.01
    assert kmeans.purity(mixed) == 0.5
    assert kmeans.normalized_mutual_information(perfect * 1000) == pytest.approx(1.0)
    # Weighted by bytes: 9 of 10 bytes of cluster 0 are code -> purity (9 + 5) / 15.
    weighted = np.array([[9, 0], [1, 5]])
    assert kmeans.purity(weighted) == pytest.approx(14 / 15)


def test_tfidf_idf_and_unknown_text():
    f = fit_tfidf(["aa bb", "aa cc", "aa"], max_features=10, svd_dims=2, seed=0)
    # idf = ln((1 + n) / (1 + df)) + 1: "aa" is in all 3 documents, "bb" in 1.
    idf = dict(zip(f.vocabulary, f.idf))
    assert idf["aa"] == pytest.approx(1.0) and idf["bb"] == pytest.approx(np.log(2) + 1)
    x = f.transform(["zz qq", "aa bb"])
    assert np.all(x[0] == 0) and np.linalg.norm(x[1]) == pytest.approx(1.0, abs=1e-6)


def test_clusters_recover_disjoint_domains_and_are_stored(clustered, corpus_file, tmp_path):
    # Every document in train (12 per domain): balanced halves can match the domains.
    spec = ClusterSpec(source=f"jsonl:{corpus_file}", num_clusters=2, svd_dims=4,
                       validation_fraction=0.0)
    meta = cluster_corpus(spec, tmp_path / "all_train")
    assert meta["agreement"]["train"]["adjusted_mutual_information"] == pytest.approx(1.0)
    assert meta["agreement"]["train"]["purity"] == 1.0
    out, meta = clustered
    clustering = load_clustering(out)
    assert clustering.centres.shape == (2, clustering.features.dims)
    assert len(clustering.assignment) == 24  # both splits
    assert abs(meta["sizes"]["train"][0] - meta["sizes"]["train"][1]) <= 1


def test_same_seed_same_clustering_and_out_is_never_overwritten(clustered, corpus_file):
    out, meta = clustered
    again = out.parent / "again"
    spec = ClusterSpec(**meta["spec"])
    cluster_corpus(spec, again)
    for name in ("assignment.jsonl", "centres.npy", "tfidf.npz"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    with pytest.raises(FileExistsError, match="--out"):
        cluster_corpus(spec, again)


def test_cluster_source_filters_the_train_split_only(clustered, corpus_file):
    out, _ = clustered
    clustering = load_clustering(out)
    for i in range(2):
        train = load_source_split(f"cluster:{out}:{i}", "train", validation_fraction=0.25)
        assert {clustering.assignment[r["path"]] for r in train.records} == {i}
        assert train.domains == ["code", "prose"]  # the whole source's, not the cluster's
    valid = load_source_split(f"cluster:{out}:0", "validation", validation_fraction=0.25)
    whole = load_source_split(f"jsonl:{corpus_file}", "validation", validation_fraction=0.25)
    assert [r["path"] for r in valid.records] == [r["path"] for r in whole.records]


@pytest.mark.parametrize("source, fraction, message", [
    ("cluster:{out}:2", 0.25, "unknown cluster id 2; the clustering has 2"),
    ("cluster:{out}", 0.25, "write 'cluster:<clustering dir>:<cluster id>'"),
    ("cluster:{out}/missing:0", 0.25, "no such clustering directory"),
    ("cluster:{out}:0", 0.05, "DataConfig.validation_fraction 0.05 differs"),
])
def test_bad_cluster_sources_name_the_binding(clustered, source, fraction, message):
    out, _ = clustered
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        load_source_split(source.format(out=out), "train", validation_fraction=fraction)


def test_missing_centres_file_is_named(clustered, tmp_path):
    out, _ = clustered
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("clusters.json", "tfidf.npz", "assignment.jsonl"):
        (broken / f).write_bytes((out / f).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"--clusters .* lacks \['centres.npy'\]"):
        load_clustering(broken)


@pytest.mark.parametrize("args, message", [
    (["--clusters=0"], "--clusters must be >= 1"),
    (["--clusters=30"], "--clusters 30 > the"),
    (["--clusters=2", "--source=shards:x"], "--source 'shards:x': cluster a text source"),
])
def test_cli_bad_input_exits_2_with_one_line(corpus_file, tmp_path, capsys, args, message):
    main = script_main("cluster_corpus.py")
    out = tmp_path / "out"
    code = main([f"--source=jsonl:{corpus_file}", f"--out={out}", "--validation_fraction=0.25",
                 *args])  # a later --source overrides the first
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
