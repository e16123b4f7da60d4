"""DeepSeek-V2/V3 checkpoints in and out: `scripts/import_hf.py` of a tiny random
`DeepseekV2/V3ForCausalLM` scores and generates like transformers, and its export
loads back into transformers with equal logits.

Variants (`DEEPSEEK`), each touching a different part of the mapping:
- `deepseek_v3`: query LoRA, YaRN (mscale != mscale_all_dim, beta_fast 8 so the ramp
  splits the 4 RoPE frequencies), interleaved RoPE, sigmoid routing with random
  `e_score_correction_bias` (std 0.3: it changes selections), 4 groups of 2, top 2
  groups, renormalised, routed_scaling_factor 2.5, one dense layer first, one
  shared expert; plus tensors of an MTP layer (`model.layers.3.*`), which
  transformers drops and so must the importer;
- `deepseek_v2_lite`: V2-Lite's shape of options: no query LoRA, `greedy` softmax
  top-2, two shared experts, YaRN with mscale = mscale_all_dim = 0.707;
- `deepseek_v2_group_limited`: query LoRA, `group_limited_greedy` (groups scored by
  their best expert), routed_scaling_factor 1.5, no dense layer, plain RoPE.

Import goes through the CLI (once per variant, shared across workers); scoring
(our forward with the checkpoint's router state, as `score.py`), generation (the
KV-cache engine of `generate.py`) and export (`export_hf`, as `export_hf.py`) run
in-process on one restore of the imported workdir: each JAX start and restore
costs seconds of compilation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
transformers = pytest.importorskip("transformers", reason="needs transformers: run "
                                   "`make test-interop`")

from tests.helpers import shared_dir  # noqa: E402
from tests.interop.families import VOCAB_SIZE, import_model  # noqa: E402
from tests.interop.test_generate_reference import NEW_TOKENS, PROMPT, eos_ids, theirs  # noqa: E402
from tests.interop.test_reference import IDS, load_logged, logits_of, reference_logprobs  # noqa: E402

_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=8,
             num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
             max_position_embeddings=64, attn_implementation="eager")
_YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
         "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 1.0}
DEEPSEEK = {
    "deepseek_v3": (transformers.DeepseekV3Config, dict(
        _BASE, q_lora_rank=24, first_k_dense_replace=1, n_shared_experts=1, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        rope_parameters=dict(_YARN, mscale=0.8, mscale_all_dim=1.0))),
    "deepseek_v2_lite": (transformers.DeepseekV2Config, dict(
        _BASE, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=2,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    "deepseek_v2_group_limited": (transformers.DeepseekV2Config, dict(
        _BASE, q_lora_rank=24, first_k_dense_replace=0, n_shared_experts=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
}
PARAMS = [pytest.param(name, id=name, marks=pytest.mark.xdist_group(name)) for name in DEEPSEEK]
# What DeepSeek-V3 checkpoints hold for an MTP layer (a few of its tensors).
MTP_TENSORS = {"model.layers.3.eh_proj.weight": (32, 64), "model.layers.3.enorm.weight": (32,),
               "model.layers.3.hnorm.weight": (32,),
               "model.layers.3.shared_head.norm.weight": (32,),
               "model.layers.3.self_attn.kv_a_layernorm.weight": (16,)}


def build(name: str):
    """The variant's tiny float32 model: weights std 0.3, norm scales in [0.5, 1.5],
    V3 correction biases std 0.3 (a buffer, which `from_config` leaves at zero)."""
    cls, kw = DEEPSEEK[name]
    config = cls(**kw)
    config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name and param_name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
        for buffer_name, b in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model.eval()


def save_with_mtp(model, hf_dir: Path, name: str) -> None:
    """`save_pretrained`; the V3 variant's file also gets an MTP layer's tensors."""
    model.save_pretrained(hf_dir)
    if name != "deepseek_v3":
        return
    from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(1)
    tensors.update({k: rng.normal(size=s).astype(np.float32) for k, s in MTP_TENSORS.items()})
    save_file(tensors, path, metadata={"format": "pt"})


class Case(NamedTuple):
    name: str
    model: Any
    logits: Any          # [n, vocab] torch float32
    root: Path           # hf/ (saved), ours/ (imported)


def shared_import(tmp_path_factory, name: str, model: Any = None) -> Path:
    """The variant `name` (`model`, or `build(name)`) saved to `<root>/hf` and imported
    to `<root>/ours` once per pytest session, shared by modules and xdist workers
    (tests only read it); returns root."""
    import fcntl  # pylint: disable=g-import-not-at-top

    root = shared_dir(tmp_path_factory, f"interop_{name}")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"interop_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "ours").is_dir():
            save_with_mtp(build(name) if model is None else model, root / "hf", name)
            import_model(root / "hf", root / "ours")
    return root


@pytest.fixture(scope="module", params=PARAMS)
def case(request, tmp_path_factory) -> Case:
    name = request.param
    model = build(name)
    root = shared_import(tmp_path_factory, name, model)
    return Case(name, model, logits_of(model, IDS)[0], root)


def measured(case: Case, what: str, value: Any) -> None:
    text = f"{value:.1e}" if isinstance(value, float | np.floating) else value
    print(f"\nMEASURED {case.name}: {what}: {text}")


_RESTORED: dict[str, Any] = {}


def restored(case: Case):
    """The imported workdir restored once per worker (restoring compiles the model's init)."""
    from experiments.inference import restore as restore_lib  # pylint: disable=g-import-not-at-top

    if case.name not in _RESTORED:
        _RESTORED[case.name] = restore_lib.restore_model(case.root / "ours")
    return _RESTORED[case.name]


def test_scores_and_greedy_generation_match_transformers(case):
    """Log-probs of IDS from our forward (as `score.py`: the checkpoint's router state
    included) within 1e-4 of transformers'; greedy KV-cache generation (the engine of
    `generate.py`) equal to transformers' `generate`."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from experiments.inference import generate as generate_lib  # pylint: disable=g-import-not-at-top

    run = restored(case)
    logits = nnx.jit(lambda m, ids: m(ids, router_state=run.router_state)[0])(
        run.model(), np.asarray([IDS], np.int32))[0]
    logprobs = np.asarray(jax.nn.log_softmax(logits[:-1], axis=-1))
    got = logprobs[np.arange(len(IDS) - 1), IDS[1:]]
    want = reference_logprobs(case.logits, IDS)
    measured(case, "score", np.max(np.abs(got - want)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.ptp(want) > 1.0  # far from uniform: a wrong model would not pass by chance

    eos = eos_ids(case.model)
    ours = generate_lib.Generator(run).generate([PROMPT], max_new_tokens=NEW_TOKENS, eos_ids=eos)[0]
    reference, _ = theirs(case.model, PROMPT, eos)
    assert ours == reference
    measured(case, "greedy", f"{len(ours)}/{len(reference)} tokens equal")


def test_export_loads_back_with_equal_logits(case, tmp_path):
    from experiments.convert.hf.exporter import export_hf  # pylint: disable=g-import-not-at-top

    out = export_hf(case.root / "ours", tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == list(case.model.config.architectures)
    loaded, info, log = load_logged(out)
    assert not {k: v for k, v in info.items() if v}, info
    assert not any(word in log for word in ("LOAD REPORT", "MISSING", "UNEXPECTED")), log
    got = logits_of(loaded, IDS)[0].numpy()
    measured(case, "export", np.max(np.abs(got - case.logits.numpy())))
    np.testing.assert_allclose(got, case.logits.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["deepseek_v3"], indirect=True)
def test_v3_correction_bias_becomes_the_loss_free_state_and_mtp_is_dropped(case):
    """The imported run continues with loss-free balancing from HF's biases; the MTP
    layer's tensors, which transformers itself reports unexpected and drops, are
    skipped and recorded."""
    from moe.router_state import SELECTION_BIAS  # pylint: disable=g-import-not-at-top

    ours = case.root / "ours"
    assert "LossFreeBalancing.enabled = True" in (ours / "config.gin").read_text()
    state = restored(case).router_state  # the checkpoint's loss-free state
    assert sorted(state.layers) == ["layer_1", "layer_2"]
    for i in (1, 2):
        want = case.model.model.layers[i].mlp.gate.e_score_correction_bias.numpy()
        np.testing.assert_array_equal(np.asarray(state.layers[f"layer_{i}"][SELECTION_BIAS]), want)
    record = json.loads((ours / "hf_import.json").read_text())
    assert record["not_imported"]["tensors"] == ["model.layers.3.*"]
    assert record["not_imported"]["count"] == len(MTP_TENSORS)
    _, info, _ = load_logged(case.root / "hf")
    assert set(MTP_TENSORS) <= set(info["unexpected_keys"])
