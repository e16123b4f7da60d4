"""lm-evaluation-harness on our checkpoints: local tasks (a task YAML and a JSONL
file written here; no hub) for each request type, run through
`lm_eval.simple_evaluate(model=SparseMoeLM(...))`, give exactly the numbers of our
own scorer and generator on a tiny imported model with its own BPE tokenizer.

Needs lm_eval: `make test-interop` (skipped in the core venv).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gin
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs lm_eval: run `make test-interop`")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSONL only, never the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from experiments.convert.hf.importer import import_hf  # noqa: E402
from experiments.inference import score as score_lib  # noqa: E402
from experiments.inference.lm_eval_adapter import SparseMoeLM, cut_at_stop  # noqa: E402
from tests.convert.test_own_vocab import write_own_vocab_llama  # noqa: E402
from tests.convert.test_upcycle_import import DATA  # noqa: E402
from tests.helpers import run_script  # noqa: E402

pytestmark = pytest.mark.xdist_group("lm_eval")
MAX_LENGTH = 12  # short, so that rolling windows and left-truncation are exercised
LL_DOCS = [{"context": "the cat sat on", "continuation": " the mat"},
           {"context": "a dog", "continuation": " and a cat"},
           {"context": "hello world, hello tokens and a dog sat on the log", "continuation": " ok"},
           {"context": "", "continuation": "the log"}]
MC_DOCS = [{"question": "the cat sat on the", "choices": [" mat", " log", " dog"], "label": 0},
           {"question": "hello", "choices": [" world", " tokens"], "label": 1}]
ROLLING_DOCS = [{"text": "the cat sat on the mat"},
                {"text": "hello world, hello tokens; the dog sat on the log, a cat and a dog"}]
GEN_DOCS = [{"prompt": "the cat", "answer": "x"}, {"prompt": "a dog sat on", "answer": "y"},
            {"prompt": "hello world, hello tokens and more words here", "answer": "z"}]
MAX_GEN_TOKS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama with 300 embedding rows and a byte-level BPE tokenizer.json, imported."""
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "hf"
    write_own_vocab_llama(model_dir)
    gin.clear_config()
    try:
        return import_hf(model_dir, root / "imported",
                         gin_files=["gin_configs/data/embedded_byte.gin"], gin_params=DATA)
    finally:
        gin.clear_config()


def _task(root: Path, name: str, docs: list[dict], **fields) -> None:
    (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    lines = [f"task: {name}", "dataset_path: json",
             f"dataset_kwargs:\n  data_files:\n    test: {root / f'{name}.jsonl'}",
             "test_split: test"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in fields.items()]
    (root / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _write_tasks(root: Path) -> None:
    _task(root, "toy_ll", LL_DOCS, output_type="loglikelihood", doc_to_text="{{context}}",
          doc_to_target="{{continuation}}", metric_list=[{"metric": "acc"}])
    _task(root, "toy_mc", MC_DOCS, output_type="multiple_choice", doc_to_text="{{question}}",
          doc_to_choice="{{choices}}", doc_to_target="{{label}}", target_delimiter="",
          metric_list=[{"metric": "acc"}])
    _task(root, "toy_rolling", ROLLING_DOCS, output_type="loglikelihood_rolling",
          doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])
    _task(root, "toy_gen", GEN_DOCS, output_type="generate_until", doc_to_text="{{prompt}}",
          doc_to_target="{{answer}}", target_delimiter="",
          generation_kwargs={"until": [".", "\n"], "max_gen_toks": MAX_GEN_TOKS,
                             "do_sample": False},
          metric_list=[{"metric": "exact_match"}])


@pytest.fixture(scope="module")
def lm(workdir) -> SparseMoeLM:
    """The adapter, restored once for the module (rows of 2: batches are exercised)."""
    return SparseMoeLM(workdir=str(workdir), batch_size=2, max_length=MAX_LENGTH)


def _evaluate(lm: SparseMoeLM, root: Path, tasks: list[str],
              generator=None) -> tuple[dict, SparseMoeLM]:
    _write_tasks(root)
    lm._generator = generator  # None: the engine's, loaded on the first generate_until
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                      task_manager=TaskManager(include_path=str(root)))
    print(f"simple_evaluate {tasks}: {time.perf_counter() - t0:.1f} s")
    return results, lm


def _responses(results: dict, task: str, docs: list[dict]) -> list:
    """Per document, the adapter's answer to each of its requests."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == docs
    return [[r[0] for r in s["resps"]] for s in samples]


def _reference_ll(scorer, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split (whole encoding minus the context's; empty context -> EOS), the
    sequence left-truncated to MAX_LENGTH inputs, scored one at a time by `score`."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else [tok.eos_id]
    cont = whole[len(ctx):] if context else tok.encode(continuation)
    seq = (ctx + cont)[-(MAX_LENGTH + 1):]
    scores = score_lib.score(scorer, seq)
    logits = np.asarray(scorer.forward(np.asarray([seq], np.int32)))[0]
    greedy = all(int(np.argmax(logits[i - 1])) == seq[i] for i in range(len(seq) - len(cont),
                                                                         len(seq)))
    return float(np.sum(scores.logprobs[-len(cont):])), greedy


def test_loglikelihood_multiple_choice_and_rolling_equal_our_scorer(lm, tmp_path):
    results, lm = _evaluate(lm, tmp_path, ["toy_ll", "toy_mc", "toy_rolling"])
    scorer, tok = lm.scorer, lm.tokenizer  # the reference: `score`, one sequence at a time
    assert type(tok).__name__ == "HFTokenizer" and tok.eos_id == 2
    # loglikelihood: (sum of the continuation's log-probs, whether greedy).
    for doc, (got,) in zip(LL_DOCS, _responses(results, "toy_ll", LL_DOCS)):
        want = _reference_ll(scorer, tok, doc["context"], doc["continuation"])
        assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == want[1], doc
    # multiple_choice: one loglikelihood per choice; acc from their argmax.
    for doc, got in zip(MC_DOCS, _responses(results, "toy_mc", MC_DOCS)):
        want = [_reference_ll(scorer, tok, doc["question"], c)[0] for c in doc["choices"]]
        np.testing.assert_allclose([g[0] for g in got], want, atol=1e-4)
    # rolling: the windows' sums; a text shorter than MAX_LENGTH is the whole text's
    # log-likelihood after EOS.
    for doc, (got,) in zip(ROLLING_DOCS, _responses(results, "toy_rolling", ROLLING_DOCS)):
        ids = tok.encode(doc["text"])
        windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            ids, tok.eos_id, MAX_LENGTH, 1)))
        want = sum(float(np.sum(score_lib.score(scorer, c + p).logprobs[-len(p):]))
                   for c, p in windows)
        assert got == pytest.approx(want, abs=1e-4)
        if len(ids) <= MAX_LENGTH:
            assert got == pytest.approx(score_lib.score(scorer, [tok.eos_id, *ids]).total,
                                        abs=1e-4)
        else:
            assert len(windows) > 1
    assert "word_perplexity,none" in results["results"]["toy_rolling"]


def test_generate_until_equals_our_greedy_generation(workdir, lm, tmp_path):
    generate = pytest.importorskip("experiments.inference.generate")
    results, lm = _evaluate(lm, tmp_path, ["toy_gen"])
    generator = generate.load_generator(workdir)
    keep = MAX_LENGTH - MAX_GEN_TOKS
    for doc, (got,) in zip(GEN_DOCS, _responses(results, "toy_gen", GEN_DOCS)):
        prompt = lm.tokenizer.encode(doc["prompt"])[-keep:]
        (new,) = generator.generate([prompt], max_new_tokens=MAX_GEN_TOKS, eos_ids=lm.eos_ids)
        assert new  # one prompt at a time, unbatched: the reference
        assert got == cut_at_stop(lm.tokenizer.decode(new), [".", "\n"])


class _ReversingGenerator:
    """Stands in for the engine: the new tokens are the prompt reversed (at most
    max_new_tokens); records its calls."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, eos_ids=(), **kwargs):
        self.calls.append(([list(p) for p in prompts], max_new_tokens, list(eos_ids), kwargs))
        return [list(reversed(p))[:max_new_tokens] for p in prompts]


def test_generate_until_batches_truncates_and_cuts(lm, tmp_path):
    """Requests go out in batches of batch_size, greedy (no sampling argument), with the
    workdir's EOS ids, prompts cut to their last max_length - max_gen_toks tokens; the
    decoded text comes back cut at the first `until` string."""
    stub = _ReversingGenerator()
    results, lm = _evaluate(lm, tmp_path, ["toy_gen"], generator=stub)
    assert [len(prompts) for prompts, *_ in stub.calls] == [2, 1]
    assert all(c[1:] == (MAX_GEN_TOKS, [2], {}) for c in stub.calls)
    keep = MAX_LENGTH - MAX_GEN_TOKS
    sent = {tuple(p) for prompts, *_ in stub.calls for p in prompts}
    for doc, (got,) in zip(GEN_DOCS, _responses(results, "toy_gen", GEN_DOCS)):
        prompt = lm.tokenizer.encode(doc["prompt"])[-keep:]
        assert tuple(prompt) in sent
        assert got == cut_at_stop(lm.tokenizer.decode(list(reversed(prompt))[:MAX_GEN_TOKS]),
                                  [".", "\n"])
    assert len(lm.tokenizer.encode(GEN_DOCS[2]["prompt"])) > keep  # truncation exercised


def test_cut_at_stop():
    assert cut_at_stop("a cat. and\nmore", [".", "\n"]) == "a cat"
    assert cut_at_stop("a cat", ["", "zz"]) == "a cat"


def test_model_args_are_checked(workdir):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 'auto'"):
        SparseMoeLM(workdir=str(workdir), batch_size="auto")
    with pytest.raises(ValueError, match=r"model args \['temperature'\] are not supported"):
        SparseMoeLM.create_from_arg_string(f"workdir={workdir},temperature=1")
    lm = SparseMoeLM.create_from_arg_string(f"workdir={workdir},batch_size=3",
                                            {"batch_size": 1, "device": None})
    assert lm.batch_size == 3 and lm.max_length == 32  # DataConfig.seq_len of DATA


def test_cli_runs_a_local_task(workdir, tmp_path):
    """scripts/lm_eval.py = lm-eval's CLI with `sparse_moe` registered."""
    _write_tasks(tmp_path)
    result = run_script("scripts/lm_eval.py", "--model", "sparse_moe", "--model_args",
                        f"workdir={workdir},max_length={MAX_LENGTH}", "--tasks", "toy_ll",
                        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
                        timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "toy_ll" in result.stdout and "acc" in result.stdout


def test_exported_tokenizer_loads_in_transformers(workdir, tmp_path):
    """import -> export carries tokenizer.json + tokenizer_config.json; transformers'
    AutoTokenizer reads them into the same ids, specials and decoded text as ours."""
    transformers = pytest.importorskip("transformers")
    from experiments.convert.hf.exporter import export_hf  # pylint: disable=g-import-not-at-top
    from experiments.inference.tokenizer import workdir_tokenizer  # pylint: disable=g-import-not-at-top

    out = export_hf(workdir, tmp_path / "export")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = workdir_tokenizer(workdir)
    for text in ("the cat sat, héllo 😀\n  indented", "hello world"):
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids + [ours.eos_id], skip_special_tokens=True) == ours.decode(
            ids + [ours.eos_id]) == text
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (
        ours.pad_id, ours.bos_id, ours.eos_id)
