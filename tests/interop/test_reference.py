"""Our imports score like transformers, our exports load back into transformers
unchanged, and our routers pick transformers' experts, for every family in
`families.FAMILIES`.

Needs torch and transformers: `make test-interop` (skipped in the core venv).
Each family's model is built, saved and imported once (a module-scoped fixture).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
pytest.importorskip("transformers", reason="needs transformers: run `make test-interop`")

from tests.helpers import run_script, shared_dir  # noqa: E402
from tests.interop.families import FAMILIES, VOCAB_SIZE, Family, save  # noqa: E402

# Positions far enough apart that a wrong RoPE base shows in the log-probs;
# longer than families.WINDOW.
IDS = [int(i) for i in np.random.default_rng(0).integers(3, VOCAB_SIZE, size=24)]
# One xdist group per family (`make test-interop` runs `--dist loadgroup`): a
# family's tests share its module-scoped import on one worker.
PARAMS = [pytest.param(f, id=f.name, marks=pytest.mark.xdist_group(f.name)) for f in FAMILIES]
MOE_PARAMS = [p for p in PARAMS if p.values[0].is_moe]
# Routing ties closer than this may legitimately break either way.
TIE = 1e-6


def random_model(family: Family):
    """A tiny float32 model with weights large enough for every part to matter
    (transformers' init, std 0.02, gives near-uniform log-probs)."""
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def logits_of(model, ids: list[int], **kw: Any):
    """transformers' forward on one sequence (`[n, vocab]` float32 logits, and the output)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), **kw)
    return out.logits[0].float(), out


def reference_logprobs(logits, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]), i = 1..n-1, from `[n, vocab]` logits."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


class Case(NamedTuple):
    family: Family
    model: Any
    logits: Any          # [n, vocab] torch float32
    workdir: Path


def shared_import(tmp_path_factory, family: Family, *flags: str) -> Path:
    """`family`'s model saved and imported (with `flags`) once per pytest session:
    the test modules and xdist workers that ask share one workdir (the models are
    deterministic; tests only read it)."""
    import fcntl  # pylint: disable=g-import-not-at-top

    name = "_".join(["interop", family.name, *(f.strip("-").replace("=", "_") for f in flags)])
    root = shared_dir(tmp_path_factory, name)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "ours").is_dir():
            save(family, random_model(family), root / "hf")
            family.import_fn(root / "hf", root / "ours", *flags)
    return root / "ours"


@pytest.fixture(scope="module", params=PARAMS)
def case(request, tmp_path_factory) -> Case:
    family = request.param
    model = random_model(family)
    workdir = shared_import(tmp_path_factory, family)
    return Case(family, model, logits_of(model, IDS)[0], workdir)


def measured(case: Case, what: str, value: Any) -> None:
    """One line with `-s` (the numbers in docs/interop.md)."""
    text = f"{value:.1e}" if isinstance(value, float | np.floating) else value
    print(f"\nMEASURED {case.family.name}: {what}: {text}")


def score(workdir, ids: list[int]) -> dict:
    result = run_script("scripts/score.py", f"--workdir={workdir}", "--json",
                        "--ids=" + ",".join(map(str, ids)))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_scores_match_transformers(case):
    want = reference_logprobs(case.logits, IDS)
    got = score(case.workdir, IDS)
    assert got["ids"] == IDS
    measured(case, "score", np.max(np.abs(np.asarray(got["logprobs"]) - want)))
    np.testing.assert_allclose(got["logprobs"], want, atol=1e-4, rtol=0)
    # The weights are far from uniform: a wrong model would not pass by chance.
    assert np.ptp(want) > 1.0


def load_logged(path: Path):
    """`from_pretrained(path)` -> (model, loading info, what transformers logged).

    transformers' logger does not propagate (pytest's caplog misses it); its
    load report lists MISSING/UNEXPECTED/MISMATCHED weights."""
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, stream.getvalue()


def test_export_loads_back_unchanged(case, tmp_path):
    out = tmp_path / "exported"
    result = run_script("scripts/export_hf.py", f"--workdir={case.workdir}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [case.family.architecture]
    loaded, info, log = load_logged(out)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    assert not any(word in log for word in ("LOAD REPORT", "MISSING", "UNEXPECTED")), log
    got = logits_of(loaded, IDS)[0].numpy()
    measured(case, "export", np.max(np.abs(got - case.logits.numpy())))
    np.testing.assert_allclose(got, case.logits.numpy(), atol=1e-5, rtol=0)


def hf_experts(model, ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per MoE layer of `model`: (top-k experts `[n, k]`, whether each token's
    k-th and (k+1)-th router probabilities differ by more than TIE `[n]`)."""
    k = model.config.num_experts_per_tok
    _, out = logits_of(model, ids, output_router_logits=True)
    layers = []
    for logits in out.router_logits:
        probs = torch.softmax(logits.reshape(len(ids), -1).float(), dim=-1)
        top = torch.topk(probs, k + 1, dim=-1)
        clear = (top.values[:, k - 1] - top.values[:, k]) > TIE
        layers.append((top.indices[:, :k].numpy(), clear.numpy()))
    return layers


def assert_routing_matches(label: str, workdir: Path, model, ids: list[int]) -> None:
    """Per MoE layer, our top-k experts (`Scorer.routing` of `workdir`) equal
    transformers' (`model`) on every token without a near tie (`hf_experts`)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from experiments.inference import score as score_lib  # pylint: disable=g-import-not-at-top

    scorer = score_lib.load_scorer(workdir)
    ours = scorer.routing(jnp.asarray([ids], jnp.int32))
    names = sorted(ours, key=lambda name: int(name.rsplit("_", 1)[-1]))
    theirs = hf_experts(model, ids)
    assert len(names) == len(theirs), (names, len(theirs))
    for name, (want, clear) in zip(names, theirs):
        got = np.sort(np.asarray(ours[name]).reshape(len(ids), -1), axis=-1)
        assert clear.sum() >= len(ids) // 2, f"{name}: too many near ties"
        agree = np.all(got == np.sort(want, axis=-1), axis=-1)
        print(f"\nMEASURED {label}: routing {name}: {agree[clear].sum()}/{clear.sum()} clear "
              f"tokens agree ({agree.sum()}/{len(ids)} with near ties)")
        np.testing.assert_array_equal(got[clear], np.sort(want, axis=-1)[clear], err_msg=name)


@pytest.mark.parametrize("case", MOE_PARAMS, indirect=True)
def test_routing_matches_transformers(case):
    assert_routing_matches(case.family.name, case.workdir, case.model, IDS)
