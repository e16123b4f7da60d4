"""Our own MoE run, exported, is the same model in transformers.

The path a user takes: a dense Llama (`families.FAMILIES`' `llama`, tiny,
random) imported with `scripts/import_hf.py`, upcycled by `scripts/upcycle.py`
to 8 experts top-2 in every layer (softmax scores renormalised over the top 2,
SwiGLU experts copied from the dense FFN, dropless, a random router), trained
a few steps by `scripts/train.py` (so experts and router leave their upcycled
start), exported by `scripts/export_hf.py`. transformers must load it as
Mixtral with no missing or unexpected weight, give our scorer's logits within
1e-4, and route every token without a near tie to our experts. The same for a gated shared expert
(-> Qwen2-MoE), trained from scratch (upcycling refuses shared experts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
pytest.importorskip("transformers", reason="needs transformers: run `make test-interop`")

from experiments.reporting.metrics import read_jsonl  # noqa: E402
from tests.helpers import run_script  # noqa: E402
from tests.interop.families import FAMILIES, save  # noqa: E402
from tests.interop.test_reference import (  # noqa: E402
    IDS,
    assert_routing_matches,
    load_logged,
    logits_of,
    random_model,
)

DENSE = next(f for f in FAMILIES if f.name == "llama")
STEPS = 3
# A tiny data pipeline for the upcycled run (the imported workdir has the
# byte tokenizer's data config at its default sizes).
TINY_DATA = ["DataConfig.seq_len = 32", "DataConfig.batch_size = 4",
             "DataConfig.eval_batch_size = 4", "DataConfig.eval_max_batches = 1",
             "DataConfig.max_bytes_per_domain = 20000"]
MIXTRAL_LIKE = ["TopKRouter.normalize = True", "MoeLayer.capacity_factor = None"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _train(workdir: Path, *flags: str) -> None:
    _ok(run_script("scripts/train.py", f"--workdir={workdir}", f"--gin_param=train.num_steps = {STEPS}",
                   "--gin_param=train.eval_every = 100", "--gin_param=train.log_every = 1",
                   "--gin_param=learning_rate_schedule.warmup_steps = 1", *flags, "--quiet",
                   timeout=300))


def upcycled_llama(tmp: Path) -> Path:
    """The imported dense Llama, upcycled to a Mixtral-like MoE, trained."""
    save(DENSE, random_model(DENSE), tmp / "hf")
    dense = DENSE.import_fn(tmp / "hf", tmp / "dense")
    moe = tmp / "moe"
    _ok(run_script("scripts/upcycle.py", f"--dense_workdir={dense}", f"--out_workdir={moe}",
                   "--moe_layers=all", "--num_experts=8", "--k=2", "--granularity=1",
                   "--router_init=normal", "--router_init_std=0.3",
                   *(f"--gin_param={g}" for g in [*MIXTRAL_LIKE, *TINY_DATA])))
    _train(moe)
    return moe


def shared_expert_from_scratch(tmp: Path) -> Path:
    """A Qwen2-MoE-like model (gated shared expert, every layer MoE, unnormalised
    top-2) trained from scratch: scripts/upcycle.py refuses shared experts (the
    dense FFN becomes the routed experts), so this is our run without upcycling."""
    workdir = tmp / "moe"
    _train(workdir, "--gin_file=gin_configs/experiments/test_tiny.gin",
           *(f"--gin_param={g}" for g in [
               "TransformerLM.activation = 'swiglu'", "MoeLayer.activation = 'swiglu'",
               "TransformerLM.moe_every = 1", "MoeLayer.num_shared_experts = 1",
               "MoeLayer.shared_d_ff = 40", "MoeLayer.shared_gate = True",
               "train.num_microbatches = 1", *TINY_DATA]))
    return workdir


class Variant(NamedTuple):
    name: str
    make: Callable[[Path], Path]   # tmp dir -> our trained MoE workdir
    architecture: str


VARIANTS = [Variant("upcycled_llama_mixtral", upcycled_llama, "MixtralForCausalLM"),
            Variant("shared_expert_qwen2_moe", shared_expert_from_scratch, "Qwen2MoeForCausalLM")]


class Run(NamedTuple):
    variant: Variant
    workdir: Path         # trained
    exported: Path


@pytest.fixture(scope="module", params=[
    pytest.param(v, id=v.name, marks=pytest.mark.xdist_group(f"own_{v.name}")) for v in VARIANTS])
def run(request, tmp_path_factory) -> Run:
    variant = request.param
    tmp = tmp_path_factory.mktemp(f"own_{variant.name}")
    workdir = variant.make(tmp)
    out = tmp / "exported"
    _ok(run_script("scripts/export_hf.py", f"--workdir={workdir}", f"--out_dir={out}"))
    return Run(variant, workdir, out)


def test_run_trained(run):
    steps = [r["step"] for r in read_jsonl(run.workdir / "metrics.jsonl", "train")]
    assert steps == list(range(1, STEPS + 1))
    assert (run.workdir / "checkpoints" / str(STEPS)).is_dir()


def test_export_is_our_model_in_transformers(run):
    config = json.loads((run.exported / "config.json").read_text())
    assert config["architectures"] == [run.variant.architecture]
    model, info, log = load_logged(run.exported)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    assert not any(word in log for word in ("LOAD REPORT", "MISSING", "UNEXPECTED")), log

    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from experiments.inference import score as score_lib  # pylint: disable=g-import-not-at-top

    ours = np.asarray(score_lib.load_scorer(run.workdir).forward(jnp.asarray([IDS], jnp.int32)))[0]
    theirs = logits_of(model, IDS)[0].numpy()
    print(f"\nMEASURED own run {run.variant.name}: logits vs transformers: "
          f"{np.abs(ours - theirs).max():.1e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1.0  # not a near-constant model
    assert_routing_matches(f"own run {run.variant.name}", run.workdir, model, IDS)
