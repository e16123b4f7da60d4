"""Every CLI reports configuration and input mistakes as one line naming the
parameter or file, exits with status 2, and writes nothing (no workdir, no lock).

All cases fail before anything is compiled; they run as subprocesses, a few at
a time, once per module.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from experiments.convert.hf.safetensors_io import write_sharded
from tests.helpers import REPO, script_command, script_env

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"


class Case(NamedTuple):
    script: str
    args: tuple[str, ...]
    expected: tuple[str, ...]  # substrings of the one error line
    workdir: str | None = None  # a path the run must not create (or change)


def _train(*params: str, expected: tuple[str, ...], workdir: str = "run") -> Case:
    return Case("scripts/train.py",
                (TINY, "--quiet", *(f"--gin_param={p}" for p in params), f"--workdir={{{workdir}}}"),
                expected, workdir)


CASES = {
    "moe_k": _train("MoeLayer.k = 5", expected=("MoeLayer.k", "num_experts=4", "got 5")),
    "old_transformer_k": _train("TransformerLM.k = 5",
                                expected=("MoeLayer.k", "got 5", "TransformerLM.k")),
    "capacity_factor_0": _train("MoeLayer.capacity_factor = 0",
                                expected=("MoeLayer.capacity_factor", "got 0")),
    "capacity_factor_negative": _train("MoeLayer.capacity_factor = -1.0",
                                       expected=("MoeLayer.capacity_factor", "got -1.0")),
    "dispatch": _train("MoeLayer.dispatch = 'magic'",
                       expected=("MoeLayer.dispatch", "'sort'", "got 'magic'")),
    "mesh_shape": _train("MESH_SHAPE = {{'data': 4}}", expected=("MESH_SHAPE", "needs 4 devices")),
    "expert_choice_causal": _train("MoeLayer.router = @ExpertChoiceRouter",
                                   expected=("ExpertChoiceRouter", "TransformerLM.causal")),
    "tokenizer": _train("DataConfig.tokenizer = 'bytes'",
                        expected=("DataConfig.tokenizer", "'byte'", "got 'bytes'")),
    "jsonl_no_text_field": _train("DataConfig.source = 'jsonl:{nofield}'",
                                  expected=("load_jsonl.text_field", "'content'", "'lang'",
                                            "nofield.jsonl:1")),
    "jsonl_empty": _train("DataConfig.source = 'jsonl:{empty}'",
                          expected=("empty.jsonl", "no records")),
    "jsonl_missing": _train("DataConfig.source = 'jsonl:{missing}'",
                            expected=("missing.jsonl", "not a file")),
    "cluster_missing": _train("DataConfig.source = 'cluster:{missing}:0'",
                              expected=("DataConfig.source", "no such clustering directory")),
    "existing_workdir": _train("MoeLayer.k = 5", expected=("MoeLayer.k",), workdir="existing"),
    "workdir_is_a_file": Case("scripts/train.py", (TINY, "--workdir={afile}"),
                              ("afile", "is a file")),
    "unknown_binding": _train("MoeLayer.nope = 1", expected=("nope",)),
    "mtp_depth": _train("TransformerLM.mtp = @MultiTokenPrediction",
                        "MultiTokenPrediction.depth = -1",
                        expected=("MultiTokenPrediction.depth", "got -1")),
    "bad_flag": Case("scripts/train.py", (TINY, "--workdir={run}", "--nope"),
                     ("--nope", "--help"), "run"),
    "upcycle_no_dense": Case("scripts/upcycle.py", ("--dense_workdir={missing}",
                                                    "--out_workdir={run}"),
                             ("missing.jsonl/config.gin", "dense_workdir"), "run"),
    "upcycle_out_is_a_file": Case("scripts/upcycle.py", ("--dense_workdir={existing}",
                                                         "--out_workdir={afile}"),
                                  ("afile", "is a file")),
    "upcycle_bad_mesh": Case("scripts/upcycle.py", ("--dense_workdir={existing}",
                                                    "--out_workdir={run}", "--mesh=expert"),
                             ("--mesh", "expert=4"), "run"),
    "analyze_not_a_workdir": Case("scripts/analyze_routing.py", ("--workdir={existing}",),
                                  ("config.gin", "existing"), "existing"),
    "sweep_missing_file": Case("scripts/sweep.py", ("{missing}.gin", "--root={run}"),
                               ("missing.jsonl.gin",), "run"),
    "sweep_bad_binding": Case("scripts/sweep.py", ("{bad_sweep}", "--root={run}"),
                              ("bad_sweep.gin", "Sweep", "bogus"), "run"),
    "sweep_run_refused": Case("scripts/sweep.py", ("{k5_sweep}", "--root={run}",
                                                   "--docs_dir={docs}"),
                              ("k5 seed 0", "exit 2", "MoeLayer.k"), "run"),
    "import_hf_no_config": Case("scripts/import_hf.py", ("--hf_dir={existing}",
                                                         "--out_workdir={run}"),
                                ("existing/config.json", "missing"), "run"),
    "import_hf_unsupported_architecture": Case(
        "scripts/import_hf.py", ("--hf_dir={hf}", "--out_workdir={run}"),
        ("architectures", "LlamaForCausalLM", "OlmoeForCausalLM"), "run"),
    "import_hf_incomplete_config": Case("scripts/import_hf.py", ("--hf_dir={hfkey}",
                                                                 "--out_workdir={run}"),
                                        ("config.json lacks", "num_attention_heads"), "run"),
    "import_hf_truncated_shard": Case("scripts/import_hf.py", ("--hf_dir={hftrunc}",
                                                               "--out_workdir={run}"),
                                      ("model.safetensors: truncated",), "run"),
    "import_hf_shape_mismatch": Case("scripts/import_hf.py", ("--hf_dir={hfshape}",
                                                              "--out_workdir={run}"),
                                     ("embedding: the model wants shape (64, 16)",
                                      "(64, 17)"), "run"),
    "import_hf_yarn_without_factor": Case("scripts/import_hf.py", ("--hf_dir={hfyarn}",
                                                                   "--out_workdir={run}"),
                                          ("rope_scaling.factor", "YaRN needs its factor"), "run"),
    "import_hf_out_is_a_file": Case("scripts/import_hf.py", ("--hf_dir={hfshape}",
                                                             "--out_workdir={afile}"),
                                    ("afile", "is a file")),
    "export_hf_not_a_workdir": Case("scripts/export_hf.py", ("--workdir={existing}",
                                                             "--out_dir={run}"),
                                    ("existing/config.gin", "missing"), "run"),
    "export_hf_no_checkpoint": Case("scripts/export_hf.py", ("--workdir={nockpt}",
                                                             "--out_dir={run}"),
                                    ("nockpt/checkpoints", "no checkpoint"), "run"),
    "score_no_checkpoint": Case("scripts/score.py", ("--workdir={nockpt}", "--ids=1,2"),
                                ("no checkpoint", "nockpt/checkpoints"), "nockpt"),
    "score_not_a_workdir": Case("scripts/score.py", ("--workdir={existing}", "--ids=1,2"),
                                ("existing/config.gin",), "existing"),
    "score_ids_not_ints": Case("scripts/score.py", ("--workdir={nockpt}", "--ids=1,x"),
                               ("--ids", "'1,x'"), "nockpt"),
    **{f"generate_{name}": Case("scripts/generate.py", ("--workdir={nockpt}", *args), expected,
                                "nockpt")
       for name, args, expected in [
           ("no_checkpoint", ("--prompt_ids=1,2", "--max_new_tokens=4"),
            ("no checkpoint", "nockpt/checkpoints")),
           ("max_new_tokens_0", ("--prompt_ids=1,2", "--max_new_tokens=0"),
            ("--max_new_tokens", "got 0")),
           ("speculative_sampling", ("--prompt_ids=1,2", "--max_new_tokens=4", "--speculative",
                                     "--temperature=1"), ("--speculative", "--temperature 0")),
           ("top_p_above_1", ("--prompt_ids=1,2", "--max_new_tokens=4", "--temperature=1",
                              "--top_p=1.5"), ("--top_p", "1.5")),
           ("top_p_0", ("--prompt_ids=1,2", "--max_new_tokens=4", "--top_p=0"),
            ("--top_p", "got 0")),
           ("negative_temperature", ("--prompt_ids=1,2", "--max_new_tokens=4",
                                     "--temperature=-1"), ("--temperature", "-1")),
           ("top_k_0", ("--prompt_ids=1,2", "--max_new_tokens=4", "--top_k=0"),
            ("--top_k", "got 0")),
           ("prompt_and_ids", ("--prompt=a", "--prompt_ids=1,2", "--max_new_tokens=4"),
            ("--prompt_ids", "not allowed with", "--prompt")),
           ("no_prompt", ("--max_new_tokens=4",),
            ("one of the arguments", "--prompt", "--batch_file", "required")),
           ("ids_not_ints", ("--prompt_ids=1,x", "--max_new_tokens=4"),
            ("--prompt_ids", "'1,x'")),
           ("eos_ids_not_ints", ("--prompt_ids=1", "--max_new_tokens=4", "--eos_ids=eos"),
            ("--eos_ids", "'eos'", "'none'")),
           ("batch_not_json", ("--batch_file={bad_jsonl}", "--max_new_tokens=4"),
            ("bad_prompts.jsonl:2", "not valid JSON")),
           ("batch_bad_key", ("--batch_file={key_jsonl}", "--max_new_tokens=4"),
            ("key_prompts.jsonl:1", "'text'", "'prompt_ids'")),
           ("batch_missing", ("--batch_file={missing}", "--max_new_tokens=4"),
            ("--batch_file", "missing.jsonl")),
       ]},
    "tokenizer_no_text_field": Case("scripts/train_tokenizer.py",
                                    ("--source=jsonl:{nofield}", "--output={run}/t.model"),
                                    ("load_jsonl.text_field", "'content'"), "run"),
    "tokenizer_empty_jsonl": Case("scripts/train_tokenizer.py",
                                  ("--source=jsonl:{empty}", "--output={run}/t.model"),
                                  ("empty.jsonl", "no records"), "run"),
    "tokenizer_missing_jsonl": Case("scripts/train_tokenizer.py",
                                    ("--source=jsonl:{missing}", "--output={run}/t.model"),
                                    ("missing.jsonl", "not a file"), "run"),
    "demo_routing_k": Case("scripts/demo_routing.py", ("--num_experts=4", "--k=5"),
                           ("MoeLayer.k", "got 5")),
    "bench_moe_layer_flag": Case("scripts/bench_moe_layer.py", ("--nope",), ("--nope",)),
    "bench_gmm_choice": Case("scripts/bench_gmm.py", ("--dtype=int8",), ("--dtype", "int8")),
    "bench_cpu_targets_section": Case("scripts/bench_cpu_targets.py",
                                      ("--json={run}/t.json", "--sections=layer,speed"),
                                      ("--sections", "'speed'"), "run"),
    "bench_sharding_flag": Case("scripts/bench_sharding.py", ("--rounds=x",), ("--rounds",)),
    "bench_balance_scope_gin": Case("scripts/bench_balance_scope.py", ("--gin_file={missing}",),
                                    ("missing.jsonl",)),
    "evomoe_report_flag": Case("scripts/evomoe_report.py", ("--window=x",), ("--window",)),
    "calibration_report_flag": Case("scripts/calibration_report.py", ("--nope",), ("--nope",)),
    "upcycling_sweep_flag": Case("scripts/upcycling_sweep.py", ("--root={run}",), ("--json",),
                                 "run"),
    "shards_not_prepared": _train("DataConfig.source = 'shards:{existing}'",
                                  expected=("existing", "no manifest.json", "prepare_data.py")),
    "prepare_data_no_match": Case("scripts/prepare_data.py", ("--input={missing}",
                                                              "--output={run}"),
                                  ("--input", "missing.jsonl", "matches no files"), "run"),
    "bench_data_flag": Case("scripts/bench_data.py", ("--sizes_mb=x",), ("--sizes_mb",)),
    "bench_mla_rounds": Case("scripts/bench_mla.py", ("--rounds=0",), ("--rounds", "got 0")),
    "bench_skip_rates": Case("scripts/bench_skip.py", ("--skip_rates=0.5,1",),
                             ("--skip_rates", "[0, 1)")),
}


def _hf_dirs(paths: dict[str, Path]) -> None:
    """HF model directories that fail at config, shard and shape checks."""
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
             "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64}
    for name in ("hfkey", "hftrunc", "hfshape", "nockpt", "hfyarn"):
        paths[name].mkdir()
    (paths["hfyarn"] / "config.json").write_text(json.dumps(  # DeepSeek-V3's legacy layout
        {**llama, "architectures": ["DeepseekV3ForCausalLM"], "num_key_value_heads": 2,
         "kv_lora_rank": 8, "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
         "v_head_dim": 8,
         "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
         "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0,
         "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 16,
                          "mscale": 1.0, "mscale_all_dim": 1.0}}))
    (paths["hfkey"] / "config.json").write_text(json.dumps(
        {k: v for k, v in llama.items() if k != "num_attention_heads"}))
    for name in ("hftrunc", "hfshape"):
        (paths[name] / "config.json").write_text(json.dumps(llama))
    write_sharded(paths["hfshape"], [("model.embed_tokens.weight", np.zeros((64, 17), np.float32))])
    write_sharded(paths["hftrunc"], [("model.embed_tokens.weight", np.zeros((64, 16), np.float32))])
    shard = paths["hftrunc"] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    (paths["nockpt"] / "config.gin").write_text("TransformerLM.d_model = 16\n")


def _inputs(base: Path) -> dict[str, str]:
    paths = {name: base / name for name in ("run", "existing", "afile", "nofield", "empty",
                                            "missing", "bad_sweep", "k5_sweep", "docs", "hf",
                                            "hfkey", "hftrunc", "hfshape", "nockpt", "hfyarn",
                                            "bad_jsonl", "key_jsonl")}
    paths["bad_jsonl"] = base / "bad_prompts.jsonl"
    paths["key_jsonl"] = base / "key_prompts.jsonl"
    paths["nofield"] = base / "nofield.jsonl"
    paths["empty"] = base / "empty.jsonl"
    paths["missing"] = base / "missing.jsonl"
    paths["bad_sweep"] = base / "bad_sweep.gin"
    paths["k5_sweep"] = base / "k5_sweep.gin"
    paths["existing"].mkdir()
    (paths["existing"] / "marker").write_text("x")
    paths["afile"].write_text("not a directory")
    paths["hf"].mkdir()
    (paths["hf"] / "config.json").write_text('{"hidden_size": 8}')
    _hf_dirs(paths)
    paths["nofield"].write_text('{"content": "some text", "lang": "en"}\n')
    paths["empty"].write_text("")
    paths["bad_jsonl"].write_text('{"prompt_ids": [1, 2]}\n{"prompt": "a"\n')
    paths["key_jsonl"].write_text('{"text": "a"}\n')
    paths["bad_sweep"].write_text("Sweep.bogus = 3\n")
    paths["k5_sweep"].write_text(
        "Sweep.gin_files = ['gin_configs/experiments/test_tiny.gin']\n"
        "Sweep.variants = {'k5': {'MoeLayer.k': 5}}\n")
    return {name: str(path) for name, path in paths.items()}


def _snapshot(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.stat().st_mtime_ns}
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def _run(case_name: str, base: Path, inputs: dict[str, str], verbose: bool = False):
    case = CASES[case_name]
    own = {k: (str(base / case_name) if k == "run" else v) for k, v in inputs.items()}
    args = [a.format(**own) for a in case.args] + (["--verbose"] if verbose else [])
    watched = Path(own[case.workdir]) if case.workdir else None
    before = _snapshot(watched) if watched else None
    result = subprocess.run(script_command(case.script, *args), cwd=REPO, env=script_env(1),
                            capture_output=True, text=True, timeout=300, check=False)
    after = _snapshot(watched) if watched else None
    return result, before, after


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_errors")
    inputs = _inputs(base)
    workers = max(1, min(4, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(_run, name, base, inputs) for name in CASES}
        verbose = pool.submit(_run, "moe_k", base, inputs, True)
        out = {name: f.result() for name, f in futures.items()}
    out["verbose"] = verbose.result()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_line_exit_2_nothing_written(results, name):
    result, before, after = results[name]
    # The sweep announces each run it starts: its progress log, not an error.
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("[sweep ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines
    for expected in CASES[name].expected:
        assert expected in lines[0], (expected, lines[0])
    assert before == after, f"{CASES[name].workdir} changed: {before} -> {after}"


def test_verbose_shows_the_traceback(results):
    result, _, after = results["verbose"]
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: MoeLayer.k ")
    assert after is None
