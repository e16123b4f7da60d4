"""Fixtures the c-BTM tests share (evaluation and generation): the tiny trained run of
the expert-surgery tests (test_tiny.gin, 6 steps) and k = 1, 2 clusterings of its corpus,
each built once per session."""

from __future__ import annotations

import pytest

from experiments.cbtm.clusters import ClusterSpec, cluster_corpus
from tests.convert.test_expert_surgery import PARAMS, TINY
from tests.helpers import shared_training_run


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "surgery_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]


@pytest.fixture(scope="session")
def tiny_clusterings(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbtm_tiny")
    for k in (1, 2):  # the corpus of test_tiny.gin
        cluster_corpus(ClusterSpec(num_clusters=k, max_bytes_per_domain=300000, svd_dims=8),
                       root / f"k{k}")
    return root
