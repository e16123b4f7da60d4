"""A corpus clustering on disk, and the `cluster:<dir>:<i>` data source.

`cluster_corpus(spec, out)` fits tf-idf features (`experiments.cbtm.features`; or uses
a run's mean hidden states, `experiments.cbtm.hidden`) and
balanced k-means (`experiments.cbtm.kmeans`) on the train split of a text source and
writes, atomically (a temporary directory renamed into place):

* `clusters.json`: the settings, the source and its split, the cluster sizes and the
  clusters' agreement with the source's domain labels (per split);
* `centres.npy`: `[k, D] float32` cluster centres (in feature space);
* `tfidf.npz`: the featuriser (vocabulary, idf, SVD components), or `hidden.json` (the
  run, checkpoint step and token count of `experiments.cbtm.hidden`);
* `assignment.jsonl`: one line per document of both splits, `{"path", "split",
  "domain", "cluster"}`: the train documents as balanced k-means assigned them, the
  validation documents to their nearest centre.

`DataConfig.source = 'cluster:<dir>:<i>'` (`experiments.data.sources`) reads the
clustering's source and keeps the documents of cluster `i`: a branch trains on its
cluster only, and its validation split is the cluster's validation documents.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from experiments.cbtm import kmeans
from experiments.cbtm.features import TfidfFeatures, fit_tfidf
from experiments.cbtm.hidden import HiddenFeatures, hidden_features
from experiments.data import corpus
from experiments.data.corpus import Record

FORMAT_VERSION = 1
CLUSTERS_FILE = "clusters.json"
CENTRES_FILE = "centres.npy"
FEATURES_FILE = "tfidf.npz"
ASSIGNMENT_FILE = "assignment.jsonl"
HIDDEN_FILE = "hidden.json"
FILES = (CLUSTERS_FILE, CENTRES_FILE, ASSIGNMENT_FILE)  # and FEATURES_FILE or HIDDEN_FILE
SOURCE_PREFIX = "cluster:"


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """What `scripts/cluster_corpus.py` clusters, and how (its flags)."""

    source: str = "embedded"
    num_clusters: int = 2
    seed: int = 0
    max_features: int = 4096
    svd_dims: int = 64
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION
    max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN
    features: str = "tfidf"  # or 'hidden:<workdir>' (experiments.cbtm.hidden)
    hidden_tokens: int = 128

    def __post_init__(self):
        if self.features != "tfidf" and not self.features.startswith("hidden:"):
            raise ValueError(f"--features must be 'tfidf' or 'hidden:<workdir>', got "
                             f"{self.features!r}")
        if self.source.startswith(SOURCE_PREFIX) or self.source.startswith("shards:"):
            raise ValueError(f"--source {self.source!r}: cluster a text source ('embedded', "
                             f"'text:<glob>' or 'jsonl:<path>')")


@dataclasses.dataclass(frozen=True)
class Clustering:
    """A clustering directory read back.

    centres: `[k, D] float32`; assignment: `{document path: cluster}` of both splits.
    """

    directory: Path
    meta: dict[str, Any]
    features: TfidfFeatures | HiddenFeatures
    centres: np.ndarray
    assignment: dict[str, int]

    @property
    def num_clusters(self) -> int:
        return int(self.centres.shape[0])

    @property
    def source(self) -> str:
        return self.meta["spec"]["source"]


def _agreement(labels: list[int], clusters: np.ndarray, sizes_in_bytes: list[int],
               domains: list[str], k: int) -> dict[str, Any]:
    table = kmeans.contingency(labels, clusters, len(domains), k)
    byte_table = kmeans.contingency(labels, clusters, len(domains), k, sizes_in_bytes)
    return {"documents": int(table.sum()),
            "adjusted_mutual_information": kmeans.adjusted_mutual_information(table),
            "purity": kmeans.purity(table),
            "byte_purity": kmeans.purity(byte_table),
            "byte_normalized_mutual_information":
                kmeans.normalized_mutual_information(byte_table),
            "documents_per_domain_and_cluster": {d: table[i].tolist()
                                                 for i, d in enumerate(domains)},
            "bytes_per_domain_and_cluster": {d: byte_table[i].tolist()
                                             for i, d in enumerate(domains)}}


def _split(spec: ClusterSpec, split: str, cache_dir: str | None):
    from experiments.data.sources import load_source_split  # pylint: disable=g-import-not-at-top
    return load_source_split(spec.source, split, validation_fraction=spec.validation_fraction,
                             cache_dir=cache_dir, max_bytes_per_domain=spec.max_bytes_per_domain)


def cluster_corpus(spec: ClusterSpec, out: str | Path, *, cache_dir: str | None = None,
                   ) -> dict[str, Any]:
    """Clusters `spec.source` into `out` (must not exist); returns `clusters.json`'s dict."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} exists: give a new directory (a "
                              f"clustering is never overwritten)")
    train, valid = _split(spec, "train", cache_dir), _split(spec, "validation", cache_dir)
    if len(train.records) < spec.num_clusters:
        raise ValueError(f"--clusters {spec.num_clusters} > the {len(train.records)} train "
                         f"documents of --source {spec.source!r}")
    features = _fit_features(spec, [r["text"] for r in train.records])
    x_train = features.transform([r["text"] for r in train.records])
    centres, train_clusters = kmeans.balanced_kmeans(x_train, spec.num_clusters, seed=spec.seed)
    x_valid = features.transform([r["text"] for r in valid.records])
    valid_clusters = (kmeans.squared_distances(x_valid, centres).argmin(1) if len(x_valid)
                      else np.zeros(0, np.int64))
    domains = train.domains
    meta = {"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec),
            "num_clusters": spec.num_clusters, "feature_dims": int(x_train.shape[1]),
            "features_file": (FEATURES_FILE if isinstance(features, TfidfFeatures)
                              else HIDDEN_FILE), "domains": domains,
            "sizes": {"train": np.bincount(train_clusters, minlength=spec.num_clusters).tolist(),
                      "validation": np.bincount(valid_clusters,
                                                minlength=spec.num_clusters).tolist()},
            "agreement": {}}
    rows = []
    for name, split, clusters in (("train", train, train_clusters),
                                  ("validation", valid, valid_clusters)):
        labels = [domains.index(r["domain"]) for r in split.records]
        if labels:
            meta["agreement"][name] = _agreement(
                labels, clusters, [len(r["text"].encode("utf-8")) for r in split.records],
                domains, spec.num_clusters)
        rows += [{"path": r["path"], "split": name, "domain": r["domain"], "cluster": int(c)}
                 for r, c in zip(split.records, clusters)]
    _write(out, meta, features, centres, rows)
    return meta


def _fit_features(spec: ClusterSpec, texts: list[str]) -> TfidfFeatures | HiddenFeatures:
    if spec.features == "tfidf":
        return fit_tfidf(texts, max_features=spec.max_features, svd_dims=spec.svd_dims,
                         seed=spec.seed)
    return hidden_features(spec.features.removeprefix("hidden:"), spec.hidden_tokens)


def _write(out: Path, meta: dict[str, Any], features: TfidfFeatures | HiddenFeatures,
           centres: np.ndarray,
           rows: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp_"))
    try:
        (tmp / CLUSTERS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        with open(tmp / CENTRES_FILE, "wb") as f:
            np.save(f, centres.astype(np.float32))
        features.save(tmp / meta["features_file"])
        with open(tmp / ASSIGNMENT_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.chmod(tmp, 0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_clustering(directory: str | Path, *, what: str = "--clusters") -> Clustering:
    """Reads a clustering directory; `what` (a flag or gin binding) names it in errors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} {str(directory)!r}: no such clustering directory "
                                f"(make one with scripts/cluster_corpus.py)")
    meta = (json.loads((directory / CLUSTERS_FILE).read_text(encoding="utf-8"))
            if (directory / CLUSTERS_FILE).is_file() else {})
    features_file = meta.get("features_file", FEATURES_FILE)
    missing = [f for f in (*FILES, features_file) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} {str(directory)!r} lacks {missing}: not a complete "
                                f"clustering of scripts/cluster_corpus.py")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{what} {str(directory)!r}: clustering format "
                         f"{meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    kind = HiddenFeatures if features_file == HIDDEN_FILE else TfidfFeatures
    assignment = {}
    with open(directory / ASSIGNMENT_FILE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            assignment[row["path"]] = int(row["cluster"])
    return Clustering(directory=directory, meta=meta,
                      features=kind.load(directory / features_file),
                      centres=np.load(directory / CENTRES_FILE, allow_pickle=False),
                      assignment=assignment)


def parse_cluster_argument(argument: str) -> tuple[str, int]:
    """`'<dir>:<i>'` (the argument of a `cluster:` source) -> (dir, i)."""
    directory, sep, index = argument.rpartition(":")
    if not sep or not directory or not index.isdigit():
        raise ValueError(f"DataConfig.source 'cluster:{argument}': write "
                         f"'cluster:<clustering dir>:<cluster id>', e.g. 'cluster:clusters/k4:0'")
    return directory, int(index)


def open_cluster_source(argument: str, validation_fraction: float | None = None,
                        ) -> tuple[Clustering, int]:
    """The clustering and cluster id of a `cluster:<dir>:<i>` source, checked."""
    directory, index = parse_cluster_argument(argument)
    what = f"DataConfig.source 'cluster:{argument}'"
    clustering = load_clustering(directory, what=what)
    if index >= clustering.num_clusters:
        raise ValueError(f"{what}: unknown cluster id {index}; the clustering has "
                         f"{clustering.num_clusters} (ids 0..{clustering.num_clusters - 1})")
    stored = clustering.meta["spec"]["validation_fraction"]
    if validation_fraction is not None and validation_fraction != stored:
        raise ValueError(f"DataConfig.validation_fraction {validation_fraction} differs from "
                         f"the clustering's {stored} ({what}): bind {stored}")
    return clustering, index


def select_cluster(records: list[Record], clustering: Clustering, index: int,
                   argument: str) -> list[Record]:
    """The records of cluster `index` (every record must be in the assignment)."""
    unknown = [r["path"] for r in records if r["path"] not in clustering.assignment]
    if unknown:
        raise ValueError(
            f"DataConfig.source 'cluster:{argument}': {len(unknown)} documents of "
            f"{clustering.source!r} (e.g. {unknown[0]!r}) are not in the clustering; cluster "
            f"the same corpus (DataConfig.max_bytes_per_domain = "
            f"{clustering.meta['spec']['max_bytes_per_domain']} there)")
    return [r for r in records if clustering.assignment[r["path"]] == index]
