"""A pruned or merged checkpoint exports to Hugging Face like any other (issue 19).

Scenario: a tiny random HF MoE (`families.FAMILIES`, 4 experts, top-2; DeepSeek
8 experts, top-2, from test_deepseek) is
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
its shared expert kept; DeepSeek-V2 greedy with two shared experts), and k
clipped to E'. Both sides compute the softmax over the E' kept router columns,
so every variant is exact. The one pruned model transformers cannot express, a
DeepSeek-V3 whose 4 groups of 2 experts become 4 groups of one after keeping 4
of 8, must be refused by the exporter (one `error:` line, nothing written).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
pytest.importorskip("transformers", reason="needs transformers: run `make test-interop`")

from tests.helpers import run_script  # noqa: E402
from tests.interop import test_deepseek  # noqa: E402
from tests.interop.families import FAMILIES  # noqa: E402
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
    source: str          # a families.FAMILIES or test_deepseek.DEEPSEEK name
    script: str
    flags: tuple[str, ...]
    num_experts: int     # E' in config.json and in the expert tensors
    k: int               # num_experts_per_tok
    refused: str = ""    # export must refuse (exit 2) with this in its one error line


SURGERIES = [
    # Renormalised top-2 over 3 kept experts of 4 (E' > k: the selection still matters).
    Surgery("mixtral_prune_keep3", "mixtral", "scripts/prune_experts.py",
            ("--keep=3", "--method=frequency"), 3, 2),
    # E' = 1 < k = 2: k clipped to 1 (every token's one expert, weight 1).
    Surgery("mixtral_prune_keep1_clip_k", "mixtral", "scripts/prune_experts.py",
            ("--keep=1", "--clip_k", "--method=random"), 1, 1),
    # Unnormalised softmax top-2 over 3 kept experts (Z' < Z: weights change; both sides agree).
    Surgery("olmoe_prune_keep3_uncurl", "olmoe", "scripts/prune_experts.py",
            ("--keep=3", "--method=uncurl"), 3, 2),
    # Merged groups (router columns combined), unnormalised, gated shared expert kept.
    Surgery("qwen2_moe_merge_keep3", "qwen2_moe_sparse_step_2", "scripts/merge_experts.py",
            ("--keep=3", "--grouping=dominant", "--method=frequency_weighted"), 3, 2),
    # DeepSeek-V2 greedy softmax (no renormalisation), two ungated shared experts kept.
    Surgery("deepseek_v2_lite_prune_keep4", "deepseek_v2_lite", "scripts/prune_experts.py",
            ("--keep=4", "--method=frequency"), 4, 2),
    # DeepSeek-V3, 4 groups of 2 experts: 4 kept experts make 4 groups of one, which
    # transformers' V3 router cannot score (the sum of each group's top 2): refused.
    Surgery("deepseek_v3_prune_keep4_groups_of_one", "deepseek_v3", "scripts/prune_experts.py",
            ("--keep=4", "--method=frequency"), 4, 2,
            refused="TopKRouter.num_groups=4: DeepseekV3 needs groups of >= 2 experts"),
]
# config.json's name for the number of routed experts.
EXPERTS_KEY = {"MixtralForCausalLM": "num_local_experts", "Qwen2MoeForCausalLM": "num_experts",
               "OlmoeForCausalLM": "num_experts", "DeepseekV2ForCausalLM": "n_routed_experts",
               "DeepseekV3ForCausalLM": "n_routed_experts"}


class Source(NamedTuple):
    architecture: str
    model: Callable[[], Any]       # the source HF model (deterministic)
    workdir: Path                  # its import, shared with the other interop tests


def _source(name: str, tmp_path_factory) -> Source:
    if name in test_deepseek.DEEPSEEK:
        cls = test_deepseek.DEEPSEEK[name][0]
        root = test_deepseek.shared_import(tmp_path_factory, name)
        return Source(cls.__name__.replace("Config", "ForCausalLM"),
                      lambda: test_deepseek.build(name), root / "ours")
    family = next(f for f in FAMILIES if f.name == name)
    return Source(family.architecture, lambda: random_model(family),
                  shared_import(tmp_path_factory, family))


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


class Exported(NamedTuple):
    surgery: Surgery
    source: Source
    workdir: Path      # pruned / merged
    exported: Path
    export_stderr: str


@pytest.fixture(scope="module", params=[
    # The source's xdist group: its import (shared_import) is shared with the source's tests.
    pytest.param(s, id=s.name, marks=pytest.mark.xdist_group(s.source)) for s in SURGERIES])
def exported(request, tmp_path_factory) -> Exported:
    surgery = request.param
    source = _source(surgery.source, tmp_path_factory)
    tmp = tmp_path_factory.mktemp(surgery.name)
    # The surgery saves its routing statistics in the source workdir: work on a copy.
    copy = tmp / "source"
    shutil.copytree(source.workdir, copy)
    workdir, out = tmp / "surgery", tmp / "exported"
    _ok(run_script(surgery.script, f"--workdir={copy}", f"--out_workdir={workdir}", *TASK,
                   *surgery.flags))
    result = run_script("scripts/export_hf.py", f"--workdir={workdir}", f"--out_dir={out}")
    assert result.returncode == (2 if surgery.refused else 0), result.stderr[-3000:]
    return Exported(surgery, source, workdir, out, result.stderr)


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
    if surgery.refused:
        errors = [line for line in exported.export_stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and surgery.refused in errors[0], exported.export_stderr[-3000:]
        assert not exported.exported.exists()
        return

    config = json.loads((exported.exported / "config.json").read_text())
    architecture = exported.source.architecture
    assert config["architectures"] == [architecture]
    assert config[EXPERTS_KEY[architecture]] == surgery.num_experts, config
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
    source = logits_of(exported.source.model(), IDS)[0].numpy()
    assert np.abs(theirs - source).max() > 1e-2
