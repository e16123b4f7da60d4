"""scripts/bench_accelerator.py: the CPU --small run writes every field, a wrong kernel
is reported as wrong (never timed), a failing case is recorded and the run goes on,
and the device's docs section is replaced, never duplicated."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import gmm, peaks, report
from moe.dispatch import tokamax_backend
from tests.helpers import REPO, run_script, start_script

TINY = gmm.GmmShape("tiny", 4, 2, 16, 16, 8)  # M = 32 rows, K = 16, N = 8
TOL = gmm.tolerance("float32", "cpu")


def _ragged(a, b, g):
    return jax.lax.ragged_dot(a, b, g)


def _one_row_late(a, b, g):
    """A plausible bug: each group's rows shifted down by one row (a bad offset)."""
    out = jax.lax.ragged_dot(a, b, g)
    return jnp.concatenate([jnp.zeros_like(out[:1]), out[:-1]])


def _explodes(a, b, g):
    raise RuntimeError("kernel failed to lower")


CANDIDATES = {"ragged_dot": gmm.Candidate(_ragged), "dense": gmm.Candidate(gmm._dense, dense=True)}


@pytest.mark.parametrize("mode", gmm.MODES)
def test_a_wrong_kernel_is_reported_as_wrong_and_not_timed(mode):
    cands = dict(CANDIDATES, gmm=gmm.Candidate(_one_row_late))
    record = gmm.run_case(TINY, "skewed", "float32", mode, cands, rounds=1, min_time=0.0,
                          tol=TOL)
    wrong = record["candidates"]["gmm"]
    assert wrong["status"] == "wrong"
    assert not wrong["correctness"]["ok"]
    assert wrong["correctness"]["rel_max_err"]["out"] > 0.1
    assert "ms" not in wrong and "tflops" not in wrong
    # The correct candidates beside it passed their check and were timed.
    right = record["candidates"]["ragged_dot"]
    assert right["status"] == "ok" and right["correctness"]["ok"] and right["ms"] > 0
    assert record["candidates"]["dense"]["status"] == "ok"


def test_a_candidate_with_wrong_gradients_is_wrong_in_fwd_bwd():
    # Right forward, gradient of lhs doubled: only the fwd_bwd check can see it.
    @jax.custom_vjp
    def bad(a, b, g):
        return jax.lax.ragged_dot(a, b, g)

    def fwd(a, b, g):
        out, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, g), a, b)
        return out, (vjp, g)

    def bwd(res, cot):
        vjp, g = res
        da, db = vjp(cot)
        return 2 * da, db, np.zeros(g.shape, jax.dtypes.float0)

    bad.defvjp(fwd, bwd)
    cands = dict(CANDIDATES, gmm=gmm.Candidate(bad))
    fwd_only = gmm.run_case(TINY, "uniform", "float32", "fwd", cands, rounds=1, min_time=0.0,
                            tol=TOL)
    assert fwd_only["candidates"]["gmm"]["status"] == "ok"
    both = gmm.run_case(TINY, "uniform", "float32", "fwd_bwd", cands, rounds=1, min_time=0.0,
                        tol=TOL)
    assert both["candidates"]["gmm"]["status"] == "wrong"
    assert both["candidates"]["gmm"]["correctness"]["rel_fro_err"]["d_lhs"] > 0.5


def test_a_failing_candidate_is_recorded_and_the_others_are_timed():
    cands = dict(CANDIDATES, gmm=gmm.Candidate(_explodes),
                 tokamax=gmm.Candidate(None, unavailable="not installed"))
    record = gmm.run_case(TINY, "uniform", "float32", "fwd", cands, rounds=2, min_time=0.0,
                          tol=TOL)
    assert record["candidates"]["gmm"] == {"status": "error",
                                           "error": "RuntimeError: kernel failed to lower"}
    assert record["candidates"]["tokamax"] == {"status": "unavailable", "reason": "not installed"}
    assert record["candidates"]["ragged_dot"]["status"] == "ok"
    assert record["candidates"]["ragged_dot"]["speedup_over_ragged_dot"] == 1.0


def test_checked_groups_cover_the_ends_the_extremes_and_an_empty_group():
    sizes = np.array([5, 0, 9, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    groups = gmm.checked_groups(sizes, seed=0)
    assert len(groups) == 8 and len(set(groups)) == 8
    assert {0, 15, 2, 1} <= set(groups)  # first, last, largest, the empty (smallest) one
    assert gmm.checked_groups(np.array([2, 0, 3]), seed=0) == [0, 1, 2]


def test_skewed_routing_sums_to_the_rows_and_is_uneven():
    shape = gmm.GmmShape("s", 64, 8, 64, 8, 8)
    uniform, skewed = (gmm.group_sizes(shape, r, seed=0) for r in gmm.ROUTINGS)
    assert uniform.sum() == skewed.sum() == shape.rows
    assert skewed.max() > 3 * uniform.max()
    assert (skewed == 0).any()  # fine-grained skew leaves experts empty


def _section_doc(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n" + report.SECTIONS_BEGIN + "\n<!-- bench-accelerator: gpu: none -->\n"
                   f"### GPU\n\n{report.NOT_MEASURED}\n<!-- /bench-accelerator: gpu: none -->\n"
                   + report.SECTIONS_END + "\n\nafter\n")
    return doc


def test_doc_section_is_replaced_not_duplicated_and_drops_the_placeholder(tmp_path):
    doc = _section_doc(tmp_path)
    report.write_doc(doc, "gpu: NVIDIA H200", "### H200\n\nfirst", "gpu")
    report.write_doc(doc, "gpu: NVIDIA H200", "### H200\n\nsecond", "gpu")
    text = doc.read_text()
    assert text.count("<!-- bench-accelerator: gpu: NVIDIA H200 -->") == 1
    assert "second" in text and "first" not in text
    assert report.NOT_MEASURED not in text  # the GPU placeholder made way
    assert text.index("second") < text.index(report.SECTIONS_END) < text.index("after")
    # Another platform's run adds its own section and leaves the GPU one alone.
    report.write_doc(doc, "cpu: cpu (--small)", "### cpu", "cpu")
    text = doc.read_text()
    assert "second" in text and text.count("### cpu") == 1


def test_doc_without_markers_is_refused(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        report.write_doc(doc, "gpu: X", "body", "gpu")


def test_the_repository_doc_has_the_markers_and_accelerator_placeholders():
    text = (REPO / "docs/benchmarks.md").read_text()
    assert report.SECTIONS_BEGIN in text and report.SECTIONS_END in text
    for platform in ("gpu", "tpu"):
        key = f"<!-- bench-accelerator: {platform}: none -->"
        assert text.count(key) + text.count(f"<!-- bench-accelerator: {platform}: ") >= 1


GMM_FIELDS = {"shape", "num_groups", "top_k", "tokens", "rows", "k", "n", "routing", "dtype",
              "mode", "flops", "group_sizes", "candidates", "seconds"}
TIMED_FIELDS = {"status", "correctness", "ms", "tflops", "pct_of_dense",
                "speedup_over_ragged_dot"}
LAYER_FIELDS = {"config", "num_experts", "k", "d_ff", "dense_d_ff", "tokens", "d_model", "dtype",
                "dispatch", "capacity_factor", "reference", "correctness", "fwd_bwd", "status",
                "seconds"}
STEP_FIELDS = {"preset", "moe_preset", "dense_preset", "batch_size", "seq_len", "vocab",
               "reference", "dispatch", "correctness", "status", "dtype", "ratio", "ratio_min",
               "ratio_max", "ms", "dense_ms", "tokens_per_s", "dense_tokens_per_s", "flops",
               "dense_flops", "mfu", "dense_mfu", "raw_s", "dense_raw_s", "cpu_ratio",
               "raw_cpu_s", "dense_raw_cpu_s"}


def test_small_cpu_run_writes_every_field_and_its_doc_section(tmp_path):
    """The CI smoke run: `--small` on CPU, end to end, as a user runs it."""
    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs/benchmarks.md", doc)
    out = tmp_path / "bench.json"
    result = run_script("scripts/bench_accelerator.py", "--small", f"--json={out}",
                        f"--doc={doc}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[" in result.stdout and "gmm mixtral_small" in result.stdout  # progress lines
    data = json.loads(out.read_text())
    assert set(data) == set(report.TOP_FIELDS)
    assert data["complete"] and data["small"] and data["device"]["platform"] == "cpu"
    assert len(data["load_average"]["start"]) == 3
    assert data["optional"]["tokamax"] == (tokamax_backend.missing() or "available")
    assert data["optional"]["megablox"] == "TPU only"
    assert {r["mode"] for r in data["gmm"]} == set(gmm.MODES)
    assert {r["routing"] for r in data["gmm"]} == set(gmm.ROUTINGS)
    for record in data["gmm"]:
        assert set(record) == GMM_FIELDS
        for name in ("gmm", "gmm_pallas_interpret", "pallas_fused_gather", "ragged_dot"):
            assert set(record["candidates"][name]) >= TIMED_FIELDS, (name, record)
            assert record["candidates"][name]["status"] == "ok"
    assert {r["dispatch"] for r in data["layer"]} >= {"sort", "pallas", "ragged_dot",
                                                      "pallas_fused", "tokamax"}
    for record in data["layer"]:
        if record["dispatch"] == "tokamax" and tokamax_backend.missing():
            assert record["status"] == "unavailable" and "'tokamax' extra" in record["reason"]
            continue
        assert set(record) == LAYER_FIELDS and record["status"] == "ok", record
    for record in data["step"]:
        assert set(record) == STEP_FIELDS | {"bindings"} and record["status"] == "ok"
        assert record["mfu"] is None  # no peak for a CPU: absent, not invented
    # The verdicts: every layer config and step preset that was timed has one.
    assert set(data["fastest"]) == {"gmm", "layer", "step"}
    assert set(data["fastest"]["layer"]) == {r["config"] for r in data["layer"]}
    assert set(data["fastest"]["step"]) == {r["preset"] for r in data["step"]}
    text = doc.read_text()
    assert "Fastest correct candidate" in text and "not a finding" in text
    assert text.count("<!-- bench-accelerator: cpu: cpu (--small) -->") == 1
    assert "| mixtral_small (8, 2, 256, 64, 128) | uniform | fwd |" in text
    assert "not measured: no device" in text  # the GPU/TPU placeholders stay


def _script():
    spec = importlib.util.spec_from_file_location("bench_accelerator",
                                                  REPO / "scripts/bench_accelerator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_shape_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """One shape's inputs cannot be made (as when they do not fit in memory): that
    case is recorded with its error, the next shape is still measured, exit 0."""
    script = _script()
    broken = gmm.GmmShape("broken", 4, 2, 16, 16, 8)
    monkeypatch.setattr(gmm, "SMALL_SHAPES", (broken, TINY))
    monkeypatch.setattr(gmm, "candidates", lambda platform, small: dict(CANDIDATES))
    real_inputs = gmm.make_inputs

    def make_inputs(shape, *args):
        if shape.name == "broken":
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating 7.5 GiB")
        return real_inputs(shape, *args)

    monkeypatch.setattr(gmm, "make_inputs", make_inputs)
    out = tmp_path / "bench.json"
    assert script.main(["--small", "--sections=gmm", "--no_doc", f"--json={out}",
                        "--rounds=1"]) == 0
    data = json.loads(out.read_text())
    by_shape = {(r["shape"], r["mode"]): r for r in data["gmm"]}
    assert len(by_shape) == 4
    for mode in gmm.MODES:
        failed = by_shape[("broken", mode)]
        assert failed["status"] == "error" and failed["error"].startswith("MemoryError: RESOURCE")
        assert by_shape[("tiny", mode)]["candidates"]["ragged_dot"]["status"] == "ok"
    assert data["complete"]  # nothing skipped for time; errors are recorded, not fatal


@pytest.mark.parametrize("args, message", [
    (["--small", "--sections=gmm,nope"], "--sections: 'nope' is not one of gmm,layer,step"),
    (["--small", "--budget_s=0"], "--budget_s must be > 0"),
    (["--small", "--dtypes=int8"], "--dtypes: 'int8' is not one of bfloat16,float32"),
    (["--small", "--doc=/nonexistent/b.md"], "--doc: '/nonexistent/b.md' is not a file"),
])
def test_bad_flags_are_refused_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script().main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_without_small_is_refused_with_the_way_out(capsys):
    assert _script().main(["--no_doc", "--json=/dev/null"]) == 2
    assert "no accelerator found (jax runs on cpu): pass --small" in capsys.readouterr().err


def test_markdown_shows_wrong_error_and_skipped_cases():
    """A run where things went wrong still renders: wrong and failed candidates are
    marked, a case that could not run and a skipped one keep their rows, errors listed."""
    ok = {"status": "ok", "tflops": 1.5, "ms": 2.0, "pct_of_dense": 80.0,
          "speedup_over_ragged_dot": 1.25}
    case = dict(shape="mixtral", num_groups=8, top_k=2, rows=16384, k=4096, n=14336,
                routing="uniform", mode="fwd",
                candidates={"gmm": {"status": "wrong", "correctness": {"ok": False}},
                            "ragged_dot": ok, "tokamax": {"status": "unavailable",
                                                          "reason": "not installed"},
                            "gmm_mosaic_gpu": {"status": "error", "error": "NotImplementedError: sm80"}})
    data = dict(device={"kind": "NVIDIA H200", "platform": "gpu", "count": 1},
                load_average={"start": [0.1, 0.2, 0.3], "end": [1.0, 1.0, 1.0]},
                command="python scripts/bench_accelerator.py", jax="0.10.2", elapsed_s=400.0,
                complete=False, timing={"rounds": 5},
                gmm=[case, dict(shape="deepseek", routing="skewed", mode="fwd_bwd",
                                status="error", error="MemoryError: out of memory"),
                     dict(shape="small", routing="skewed", mode="fwd", status="skipped")],
                layer=[dict(config="E8_k2", dispatch="pallas", capacity_factor=None,
                            status="error", error="ValueError: bad tiling")],
                step=[dict(preset="top2_small", dispatch="sort", status="ok", ratio=1.1, ms=10.0,
                           dense_ms=9.0, tokens_per_s=1e6, mfu=0.4, dense_mfu=0.45)])
    text = report.markdown(data, "bench.json")
    assert "### NVIDIA H200 (gpu, 1 device(s))" in text and "incomplete" in text
    assert "| **wrong** | 1.5 TF/s, 80%, 1.25x rd | n/a | **error** |" in text
    assert "| deepseek | skewed | fwd_bwd | error | error | error | error |" in text
    assert "| small | skewed | fwd | skipped |" in text
    assert "n/a: tokamax: not installed" in text
    assert "| top2_small | sort | 1.10x | 10 | 9 | 1e+06 | 40.0% / 45.0% |" in text
    assert "- deepseek skewed fwd_bwd: MemoryError: out of memory" in text
    assert "- mixtral/gmm_mosaic_gpu: NotImplementedError: sm80" in text
    assert "- E8_k2/pallas: ValueError: bad tiling" in text


def test_sigterm_still_writes_the_partial_results(tmp_path):
    """`timeout` (scripts/device_bench.sh) sends SIGTERM: the cases measured so far are
    kept, the JSON says incomplete, the docs section is written, exit status 1."""
    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs/benchmarks.md", doc)
    out = tmp_path / "bench.json"
    process = start_script("scripts/bench_accelerator.py", "--small", "--sections=gmm",
                           f"--json={out}", f"--doc={doc}", log_path=tmp_path / "log")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and json.loads(out.read_text())["gmm"]:
                break  # the first case is in: stop the run in the middle of the second
            time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "log").read_text()[-2000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 1, (tmp_path / "log").read_text()[-2000:]
    finally:
        process.kill()
    data = json.loads(out.read_text())
    assert not data["complete"] and 1 <= len(data["gmm"]) < 4
    assert "stopped by signal 15: writing the results measured so far" in (
        tmp_path / "log").read_text()
    section = doc.read_text().split("<!-- bench-accelerator: cpu: cpu (--small) -->")[1]
    assert "(incomplete: stopped early)" in section
    assert "| mixtral_small (8, 2, 256, 64, 128) | uniform | fwd |" in section


def test_peaks_give_mfu_only_where_known():
    assert peaks.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert peaks.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peaks.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert peaks.peak_tflops("NVIDIA H200", "float32") is None  # TF32 or not: not guessed
    assert peaks.peak_tflops("cpu", "bfloat16") is None
    assert peaks.mfu(989e12 * 0.5, 1.0, "NVIDIA H200", "bfloat16") == pytest.approx(0.5)
    assert peaks.mfu(1e12, 1.0, "cpu", "float32") is None


def test_the_verdict_names_the_fastest_correct_candidate_against_the_default():
    """Layer E8_k2: pallas_fused (1.10x) beats the default sort (1.30x); tokamax was
    faster still but wrong, and sort at capacity 1.25 (0.90x) does less work: neither
    counts. Layer E64_k8: only sort was timed. Grouped matmul: tokamax at 80% of dense
    beats the project's gmm kernel at 50%; dense itself is the yardstick, not a
    candidate. Step: sort is the fastest, nothing to follow."""
    def layer(config, dispatch, ratio, status="ok", cf=None):
        return dict(config=config, dispatch=dispatch, capacity_factor=cf, status=status,
                    fwd_bwd={"ratio": ratio})

    data = dict(
        small=False,
        gmm=[dict(shape="mixtral", routing="uniform", dtype="bfloat16", mode="fwd",
                  candidates={"gmm": {"status": "ok", "pct_of_dense": 50.0},
                              "tokamax": {"status": "ok", "pct_of_dense": 80.0},
                              "ragged_dot": {"status": "wrong"},
                              "dense": {"status": "ok", "pct_of_dense": 100.0}})],
        layer=[layer("E8_k2", "sort", 1.3), layer("E8_k2", "pallas_fused", 1.1),
               layer("E8_k2", "tokamax", 0.5, status="wrong"),
               layer("E8_k2", "sort", 0.9, cf=1.25), layer("E64_k8", "sort", 1.4)],
        step=[dict(preset="top2_small", dispatch="sort", status="ok", ratio=1.1),
              dict(preset="top2_small", dispatch="pallas", status="ok", ratio=1.2)])
    data["fastest"] = report.fastest_summary(data)
    e8 = data["fastest"]["layer"]["E8_k2"]
    assert (e8["dispatch"], e8["ratio"], e8["default"], e8["default_ratio"]) == (
        "pallas_fused", 1.1, "sort", 1.3)
    assert data["fastest"]["layer"]["E64_k8"]["dispatch"] == "sort"
    kernel = data["fastest"]["gmm"]["mixtral uniform bfloat16 fwd"]
    assert kernel["dispatch"] == "tokamax" and kernel["candidates"] == {"gmm": 2.0,
                                                                      "tokamax": 1.25}
    lines = report.verdict_lines(data)
    assert lines == [
        "- gmm mixtral uniform bfloat16 fwd: `tokamax` 1.25x dense; **faster than the "
        "default `gmm`** (2.00x)",
        "- layer E8_k2: `pallas_fused` 1.10x dense; **faster than the default `sort`** "
        "(1.30x): the default on this backend should follow it",
        "- layer E64_k8: `sort` 1.40x dense; the default is the fastest",
        "- step top2_small: `sort` 1.10x dense; the default is the fastest"]
