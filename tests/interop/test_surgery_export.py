"""A pruned or merged checkpoint exports to Hugging Face like any other (issue 19).

Scenario: a tiny random HF MoE (`families.FAMILIES`, 4 experts, top-2) is
imported, then `scripts/prune_experts.py` / `scripts/merge_experts.py` shrink
its experts (statistics from one batch of the embedded corpus), then
`scripts/export_hf.py` writes the result. transformers must load the export
with nothing missing or unexpected, with the pruned expert count and top-k
(`--clip_k`: k = E') in config.json and in its expert tensors, and give our
pruned model's logits (`Scorer.forward` of the new workdir) within 1e-4, the
tolerance of our scorer against transformers elsewhere (test_own_run.py). The
pruned model must also differ from the source (the surgery changed something).

Each softmax top-k variant transformers offers is covered once: renormalised
top-k (Mixtral, where pruning keeps the weights of untouched tokens), top-k of
the softmax over the kept experts without renormalisation (OLMoE; Qwen2-MoE with
its shared expert kept), and k clipped to E'. Both sides compute the softmax
over the E' kept router columns, so every variant is exact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
pytest.importorskip("transformers", reason="needs transformers: run `make test-interop`")

from tests.helpers import run_script  # noqa: E402
from tests.interop.families import FAMILIES, Family  # noqa: E402
from tests.interop.test_reference import (  # noqa: E402
    IDS,
    load_logged,
    logits_of,
    random_model,
    shared_import,
)

# One batch of the run's own data (the embedded corpus, byte tokenizer) as the task.
TASK = ["--task_batches=1", "--optimizer_state=reset"]


class Surgery(NamedTuple):
    name: str
    family: str          # families.FAMILIES name of the source
    script: str
    flags: tuple[str, ...]
    num_experts: int     # E' in config.json and in the expert tensors
    k: int               # num_experts_per_tok


SURGERIES = [
    # Renormalised top-2 over 2 kept experts of 4.
    Surgery("mixtral_prune_keep2", "mixtral", "scripts/prune_experts.py",
            ("--keep=2", "--method=frequency"), 2, 2),
    # E' = 1 < k = 2: k clipped to 1 (every token's one expert, weight 1).
    Surgery("mixtral_prune_keep1_clip_k", "mixtral", "scripts/prune_experts.py",
            ("--keep=1", "--clip_k", "--method=random"), 1, 1),
    # Unnormalised softmax top-2 over 3 kept experts (Z' < Z: weights change; both sides agree).
    Surgery("olmoe_prune_keep3_uncurl", "olmoe", "scripts/prune_experts.py",
            ("--keep=3", "--method=uncurl"), 3, 2),
    # Merged groups (router columns combined), unnormalised, gated shared expert kept.
    Surgery("qwen2_moe_merge_keep2", "qwen2_moe_sparse_step_2", "scripts/merge_experts.py",
            ("--keep=2", "--grouping=dominant", "--method=frequency_weighted"), 2, 2),
]


def _family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


class Exported(NamedTuple):
    surgery: Surgery
    source: Path       # the imported workdir (shared, read only)
    workdir: Path      # pruned / merged
    exported: Path


@pytest.fixture(scope="module", params=[
    # The source family's xdist group: its import (test_reference.shared_import) is shared.
    pytest.param(s, id=s.name, marks=pytest.mark.xdist_group(s.family)) for s in SURGERIES])
def exported(request, tmp_path_factory) -> Exported:
    surgery = request.param
    source = shared_import(tmp_path_factory, _family(surgery.family))
    tmp = tmp_path_factory.mktemp(surgery.name)
    # The surgery saves its routing statistics in the source workdir: work on a copy.
    copy = tmp / "source"
    shutil.copytree(source, copy)
    workdir, out = tmp / "surgery", tmp / "exported"
    _ok(run_script(surgery.script, f"--workdir={copy}", f"--out_workdir={workdir}", *TASK,
                   *surgery.flags))
    _ok(run_script("scripts/export_hf.py", f"--workdir={workdir}", f"--out_dir={out}"))
    return Exported(surgery, source, workdir, out)


def _expert_counts(model) -> set[int]:
    """The expert dimension of every router (`[E, d]`) and routed-expert tensor
    (transformers 5's fused `experts.gate_up_proj [E, 2f, d]`, `down_proj [E, d, f]`)."""
    counts = set()
    for name, p in model.state_dict().items():
        if re.search(r"\.experts\.(gate_up_proj|down_proj)$", name) or re.search(
                r"(mlp|block_sparse_moe)\.gate\.weight$", name):
            counts.add(int(p.shape[0]))
    assert counts, "no router or expert tensor found"
    return counts


def test_pruned_export_is_the_pruned_model(exported):
    surgery = exported.surgery
    record = json.loads((exported.workdir / "surgery.json").read_text())
    assert (record["new_num_experts"], record["new_k"]) == (surgery.num_experts, surgery.k), record

    config = json.loads((exported.exported / "config.json").read_text())
    family = _family(surgery.family)
    assert config["architectures"] == [family.architecture]
    experts_key = "num_local_experts" if family.architecture == "MixtralForCausalLM" \
        else "num_experts"
    assert config[experts_key] == surgery.num_experts, config
    assert config["num_experts_per_tok"] == surgery.k, config

    model, info, log = load_logged(exported.exported)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    assert not any(word in log for word in ("LOAD REPORT", "MISSING", "UNEXPECTED")), log
    assert _expert_counts(model) == {surgery.num_experts}

    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from experiments.inference import score as score_lib  # pylint: disable=g-import-not-at-top

    ours = np.asarray(score_lib.load_scorer(exported.workdir).forward(
        jnp.asarray([IDS], jnp.int32)))[0]
    theirs = logits_of(model, IDS)[0].numpy()
    print(f"\nMEASURED {surgery.name}: pruned logits vs transformers: "
          f"{np.abs(ours - theirs).max():.1e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # Not the source model: the surgery changed the function, and the export carries it.
    source = logits_of(random_model(family), IDS)[0].numpy()
    assert np.abs(theirs - source).max() > 1e-2
