"""scripts/generate.py on a tiny run trained 2 steps (MoE with a capacity factor
that drops, loss-free selection biases; nearly its random init, whose greedy
continuations vary from token to token, unlike a briefly trained model's,
which repeats the most frequent byte).

Greedy output is checked against argmax decoding with full forward passes (no
cache) of the scorer, which restores the model the same way (dropless, biases
applied); a batch file gives, line by line, what each prompt gives alone;
EOS stops a sequence after the EOS token; top_k=1 sampling is greedy whatever
the temperature; the seed decides a sampled sequence. The one-line errors of
inputs that need no model are in tests/test_cli_errors.py; here the ones that
need the model's vocabulary, and the batch-file parser's messages.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.inference import generate_cli
from experiments.inference import score as score_lib
from tests.helpers import run_script, shared_training_run

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
PARAMS = ("train.num_steps = 2", "LossFreeBalancing.enabled = True",
          "LossFreeBalancing.rate = 0.05", "MoeLayer.capacity_factor = 0.5")
PROMPT_IDS = [1, 72]  # ByteTokenizer: BOS, "E"
TEXT = "Hello"
NEW = 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "generate_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]


def _generate(workdir, *args: str) -> list[dict]:
    result = run_script("scripts/generate.py", f"--workdir={workdir}", "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


@pytest.fixture(scope="module")
def reference(workdir):
    """Greedy continuation of PROMPT_IDS by argmax over full forward passes:
    (new ids, the logit margin top-1 minus top-2 at each step)."""
    scorer = score_lib.load_scorer(workdir)
    ids, margins = list(PROMPT_IDS), []
    for _ in range(NEW):
        logits = np.asarray(scorer.forward(jnp.asarray([ids]))[0, -1])
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ids.append(int(np.argmax(logits)))
    return ids[len(PROMPT_IDS):], margins


def _assert_greedy(got: list[int], want: list[int], margins: list[float]) -> None:
    """Equal, or differing first where the reference's top two logits nearly tie."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert margins[i] < 1e-4, (i, got, want, margins[i])
            return
    assert len(got) == len(want)


@pytest.fixture(scope="module")
def greedy(workdir):
    ids = ",".join(map(str, PROMPT_IDS))
    return _generate(workdir, f"--prompt_ids={ids}", f"--max_new_tokens={NEW}",
                     "--eos_ids=none")


def test_greedy_is_argmax_of_the_full_forward(greedy, reference):
    [record] = greedy
    assert record["prompt"] == 0 and record["prompt_ids"] == PROMPT_IDS
    assert record["stop"] == "length"
    assert len(set(reference[0])) > NEW // 2  # a continuation that varies
    _assert_greedy(record["ids"], *reference)
    # The byte tokenizer decodes the new tokens.
    assert record["text"] == bytes(i - 3 for i in record["ids"] if i >= 3).decode(
        "utf-8", errors="replace")


def test_batch_file_gives_each_prompt_as_alone(workdir, greedy, tmp_path):
    """Ragged prompts (text and ids, 2 to 7 tokens) in one batch, output in input order."""
    batch = tmp_path / "prompts.jsonl"
    lines = [{"prompt_ids": [1, 100, 101, 102, 35, 103, 104]}, {"prompt": TEXT},
             {"prompt_ids": PROMPT_IDS}]
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = _generate(workdir, f"--batch_file={batch}", f"--max_new_tokens={NEW}",
                        "--eos_ids=none")
    assert [r["prompt"] for r in records] == [0, 1, 2]
    assert records[0]["prompt_ids"] == lines[0]["prompt_ids"]
    assert records[1]["prompt_ids"] == [b + 3 for b in TEXT.encode()]
    assert records[2]["ids"] == greedy[0]["ids"]
    [alone] = _generate(workdir, f"--prompt={TEXT}", f"--max_new_tokens={NEW}", "--eos_ids=none")
    assert alone["prompt_ids"] == records[1]["prompt_ids"]
    assert alone["ids"] == records[1]["ids"]
    assert all(len(r["ids"]) == NEW for r in records)


def test_eos_stops_after_the_eos_token(workdir, greedy):
    ids = greedy[0]["ids"]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    [record] = _generate(workdir, "--prompt_ids=" + ",".join(map(str, PROMPT_IDS)),
                         f"--max_new_tokens={NEW}", f"--eos_ids={ids[k]},258")
    assert record["ids"] == ids[:k + 1]
    assert record["stop"] == "eos"


def test_sampling(workdir, greedy, tmp_path):
    """top_k=1 is greedy at any temperature; at temperature 5 (12 draws over 259
    ids), rows of one batch differ, and the seed decides the draws."""
    prompt = "--prompt_ids=" + ",".join(map(str, PROMPT_IDS))
    flags = (f"--max_new_tokens={NEW}", "--eos_ids=none", "--temperature=5")
    [top1] = _generate(workdir, prompt, *flags, "--top_k=1", "--seed=3")
    assert top1["ids"] == greedy[0]["ids"]
    batch = tmp_path / "twice.jsonl"
    batch.write_text(2 * (json.dumps({"prompt_ids": PROMPT_IDS}) + "\n"))
    runs = [[r["ids"] for r in _generate(workdir, f"--batch_file={batch}", *flags,
                                         f"--seed={s}")] for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]
    assert runs[0] != runs[2]
    assert greedy[0]["ids"] not in runs[0] + runs[2]


def test_ids_outside_the_vocabulary(workdir, tmp_path):
    result = run_script("scripts/generate.py", f"--workdir={workdir}", "--prompt_ids=1,72,259",
                        "--max_new_tokens=2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --prompt_ids: token id 259 is outside the vocabulary [0, 259)"]
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [-1]}\n')
    result = run_script("scripts/generate.py", f"--workdir={workdir}", f"--batch_file={batch}",
                        "--max_new_tokens=2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: b.jsonl:2: token id -1 is outside the vocabulary [0, 259)"]


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a"}\nnot json\n', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n\n{"text": "b"}\n',
     "p.jsonl:3: key 'text' is not one of ('prompt', 'prompt_ids')"),
    ('{"prompt": "a", "prompt_ids": [1]}\n', "p.jsonl:1: give exactly one of the keys"),
    ('{}\n', "p.jsonl:1: give exactly one of the keys"),
    ('[1, 2]\n', "p.jsonl:1: expected a JSON object"),
    ('{"prompt": 3}\n', "p.jsonl:1: key 'prompt' must be a string"),
    ('{"prompt_ids": [1, "2"]}\n', "p.jsonl:1: key 'prompt_ids' must be a list of integers"),
    ('{"prompt_ids": [1, true]}\n', "p.jsonl:1: key 'prompt_ids' must be a list of integers"),
    ('\n\n', "holds no prompts"),
])
def test_batch_file_errors_name_line_and_key(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=None) as error:
        generate_cli.read_batch_file(path)
    assert expected in str(error.value)


def test_batch_file_keeps_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_ids": [5, 6]}\n\n{"prompt": "x"}\n')
    requests = generate_cli.read_batch_file(path)
    assert requests == [generate_cli.Request(0, "p.jsonl:1", ids=(5, 6)),
                        generate_cli.Request(1, "p.jsonl:3", text="x")]


@pytest.mark.parametrize("kwargs, flag", [
    (dict(temperature=-0.5, top_k=None, top_p=None), "--temperature"),
    (dict(temperature=1.0, top_k=0, top_p=None), "--top_k"),
    (dict(temperature=1.0, top_k=None, top_p=0.0), "--top_p"),
    (dict(temperature=1.0, top_k=None, top_p=1.5), "--top_p"),
])
def test_sampling_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError) as error:
        generate_cli.sampling_config(**kwargs)
    assert str(error.value).startswith(flag), str(error.value)


def test_eos_ids_flag():
    assert generate_cli.parse_eos_ids(None) is None
    assert generate_cli.parse_eos_ids("none") == []
    assert generate_cli.parse_eos_ids("2, 7") == [2, 7]
    for bad in ("x", ","):
        with pytest.raises(ValueError, match="--eos_ids"):
            generate_cli.parse_eos_ids(bad)


def test_result_records():
    requests = [generate_cli.Request(0, "a", ids=(1,)), generate_cli.Request(1, "b", text="hi")]
    records = generate_cli.result_records(
        requests, [[1], [4, 5]], [[7, 2], [9]], eos_ids=[2],
        decode=lambda ids: None if 9 in ids else "x" * len(ids))
    assert records == [
        {"prompt": 0, "prompt_ids": [1], "ids": [7, 2], "stop": "eos", "text": "xx"},
        {"prompt": 1, "prompt_ids": [4, 5], "ids": [9], "stop": "length"}]
