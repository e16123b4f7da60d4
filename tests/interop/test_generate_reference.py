"""Greedy generation equals transformers', for every family in `families.FAMILIES`.

Import -> `scripts/generate.py --temperature=0 --json` (the KV-cache engine)
for 32 new tokens vs transformers `generate(do_sample=False,
max_new_tokens=32)` on the same model. Both stop after the first EOS of the
HF config's `eos_token_id` (given to ours as `--eos_ids`: without it, a model
whose config has none, like Qwen2's, would stop at the data tokenizer's EOS on
our side only; transformers pads after its EOS, which we cut). Where the two
sequences part, greedy decoding met a near tie: the test then checks that
transformers' top-2 logit margin at that step is below NEAR_TIE and says so
(float32 sums in another order may pick the other token), and compares
nothing after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
pytest.importorskip("transformers", reason="needs transformers: run `make test-interop`")

from tests.helpers import REPO, run_script  # noqa: E402
from tests.interop.test_reference import IDS, case  # noqa: E402,F401  (the per-family fixture)

NEW_TOKENS = 32
PROMPT = IDS[:8]
NEAR_TIE = 1e-5


def eos_ids(model) -> list[int]:
    """The model's EOS ids inside its vocabulary (ids outside can never be generated)."""
    eos = model.config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [int(e) for e in eos if 0 <= e < model.config.vocab_size]


def until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """`ids` up to and including the first EOS."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i + 1]
    return ids


def ours(workdir: Path, prompt: list[int], eos: list[int]) -> list[int]:
    """Our greedy continuation: the CLI when it exists, else the engine's API."""
    if (REPO / "scripts" / "generate.py").is_file():
        result = run_script("scripts/generate.py", f"--workdir={workdir}", "--json",
                            "--prompt_ids=" + ",".join(map(str, prompt)),
                            f"--max_new_tokens={NEW_TOKENS}", "--temperature=0",
                            "--eos_ids=" + (",".join(map(str, eos)) or "none"))
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])["ids"]
    generate = pytest.importorskip("experiments.inference.generate",
                                   reason="the generation engine has not landed")
    return generate.load_generator(workdir).generate([prompt], max_new_tokens=NEW_TOKENS,
                                                     eos_ids=eos)[0]


def theirs(model, prompt: list[int], eos: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy continuation (cut after its first EOS) and its
    logits at each step (`[vocab]` float32 each)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=eos or None, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True)
    new = [int(t) for t in out.sequences[0, len(prompt):]]
    return until_eos(new, eos), [step[0].float().numpy() for step in out.logits]


def test_greedy_generation_matches_transformers(case):  # noqa: F811
    eos = eos_ids(case.model)
    got = ours(case.workdir, PROMPT, eos)
    want, logits = theirs(case.model, PROMPT, eos)
    assert len(want) == NEW_TOKENS or want[-1] in eos, want
    if got == want:
        print(f"\nMEASURED {case.family.name}: greedy: {len(want)}/{len(want)} tokens equal")
        return
    common = min(len(got), len(want))
    first = next((i for i in range(common) if got[i] != want[i]), common)
    assert first < common, f"same tokens, different lengths: ours {got}, transformers {want}"
    top2 = np.sort(logits[first])[-2:]
    margin = float(top2[1] - top2[0])
    print(f"\nMEASURED {case.family.name}: greedy: first {first} tokens equal, then a near "
          f"tie (transformers' top-2 logit margin {margin:.1e} < {NEAR_TIE})")
    assert margin < NEAR_TIE, (
        f"token {first} differs (ours {got[first]}, transformers {want[first]}) although "
        f"transformers' top-2 logit margin is {margin:.2e} >= {NEAR_TIE}")
    assert sorted(np.argsort(logits[first])[-2:].tolist()) == sorted([got[first], want[first]])
