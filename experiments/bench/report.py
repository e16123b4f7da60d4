"""The accelerator benchmark's outputs: the JSON file (written atomically after
every case, so a killed run keeps what it measured) and the markdown section
of docs/benchmarks.md for one device (replaced in place, never duplicated)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe.dispatch.registry import DEFAULT_DISPATCH

# Top-level fields of the JSON file (tests/bench/test_bench_accelerator.py checks them).
TOP_FIELDS = ("schema", "command", "small", "device", "jax", "jaxlib", "host",
              "load_average", "budget_s", "elapsed_s", "timing", "optional", "gmm", "layer",
              "step", "fastest", "complete")
SECTIONS_BEGIN = "<!-- bench-accelerator sections: begin -->"
SECTIONS_END = "<!-- bench-accelerator sections: end -->"
NOT_MEASURED = "not measured: no device"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes `data` to `path` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)


def section_key(device_kind: str, platform: str, small: bool) -> str:
    return f"{platform}: {device_kind}" + (" (--small)" if small else "")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench-accelerator: {key} -->", f"<!-- /bench-accelerator: {key} -->"


def replace_section(text: str, key: str, body: str, platform: str) -> str:
    """`text` with the section `key` set to `body`: replaced where it exists, else
    inserted before the end marker (the platform's "not measured" placeholder,
    key `<platform>: none`, is dropped once a real device of it is written)."""
    if SECTIONS_BEGIN not in text or SECTIONS_END not in text:
        raise ValueError(f"the benchmarks file lacks the markers {SECTIONS_BEGIN!r} and "
                         f"{SECTIONS_END!r}")
    if key != f"{platform}: none":
        text = _drop(text, f"{platform}: none")
    begin, end = _markers(key)
    block = f"{begin}\n{body.strip()}\n{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.replace(SECTIONS_END, block + "\n" + SECTIONS_END, 1)


def _drop(text: str, key: str) -> str:
    begin, end = _markers(key)
    return re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n*", "", text, flags=re.S)


def write_doc(path: Path, key: str, body: str, platform: str) -> None:
    text = replace_section(path.read_text(encoding="utf-8"), key, body, platform)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- markdown

def _num(value: Any, fmt: str = ".3g") -> str:
    return "" if value is None else format(value, fmt)


def _gmm_cell(c: dict[str, Any]) -> str:
    status = c.get("status")
    if status != "ok":
        return {"unavailable": "n/a"}.get(status, f"**{status}**")
    cell = f"{c['tflops']:.3g} TF/s"
    if "pct_of_dense" in c:
        cell += f", {c['pct_of_dense']:.0f}%"
    if "speedup_over_ragged_dot" in c:
        cell += f", {c['speedup_over_ragged_dot']:.2f}x rd"
    return cell


def gmm_table(records: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(n for r in records for n in r.get("candidates", {})))
    if not names:
        return ["(no grouped matmul case ran)"]
    lines = ["| shape (E, k, M, K, N) | routing | mode | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]
    for r in records:
        if "candidates" not in r:
            lines.append(f"| {r.get('shape')} | {r.get('routing')} | {r.get('mode')} | "
                         + " | ".join([r.get("status", "?")] * len(names)) + " |")
            continue
        shape = f"{r['shape']} ({r['num_groups']}, {r['top_k']}, {r['rows']}, {r['k']}, {r['n']})"
        cells = [_gmm_cell(r["candidates"].get(n, {"status": "-"})) for n in names]
        lines.append(f"| {shape} | {r['routing']} | {r['mode']} | " + " | ".join(cells) + " |")
    unavailable = {n: c.get("reason") for r in records for n, c in r.get("candidates", {}).items()
                   if c.get("status") == "unavailable"}
    if unavailable:
        lines.append("")
        lines.append("n/a: " + "; ".join(f"{n}: {why}" for n, why in unavailable.items()))
    return lines


def layer_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| config | dispatch | capacity factor | fwd+bwd vs dense | MoE ms | dense ms |"
             " reference |", "|---|---|---|---|---|---|---|"]
    for r in records:
        cf = "dropless" if r.get("capacity_factor") is None else r["capacity_factor"]
        if r.get("status") == "ok":
            fb = r["fwd_bwd"]
            cells = [f"{fb['ratio']:.2f}x ({fb['ratio_min']:.2f}-{fb['ratio_max']:.2f})",
                     _num(fb["ms"]), _num(fb["dense_ms"])]
        else:
            cells = [f"**{r.get('status')}**", "", ""]
        lines.append(f"| {r.get('config')} | {r.get('dispatch')} | {cf} | "
                     + " | ".join(cells) + f" | {r.get('reference', '')} |")
    return lines


def step_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| MoE preset vs dense | dispatch | step vs dense | MoE ms | dense ms | MoE tokens/s |"
             " MFU MoE / dense |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") == "ok":
            mfu = ("absent (peak unknown)" if r["mfu"] is None else
                   f"{100 * r['mfu']:.1f}% / {100 * (r['dense_mfu'] or 0):.1f}%")
            cells = [f"{r['ratio']:.2f}x", _num(r["ms"]), _num(r["dense_ms"]),
                     _num(r["tokens_per_s"], ".4g"), mfu]
        else:
            cells = [f"**{r.get('status')}**", "", "", "", ""]
        lines.append(f"| {r.get('preset')} | {r.get('dispatch')} | " + " | ".join(cells) + " |")
    return lines


def fastest(timed: dict[str, dict[str, float]], default: str) -> dict[str, dict[str, Any]]:
    """`timed`: `{case: {candidate: figure, lower is faster}}` of the candidates that
    passed their correctness check. Per case: the fastest beside the default,
    `{"dispatch", "ratio", "default", "default_ratio" (None if the default was not
    timed), "candidates"}`; cases with nothing timed are left out."""
    return {case: {"dispatch": min(c, key=c.get), "ratio": min(c.values()),
                   "default": default, "default_ratio": c.get(default), "candidates": c}
            for case, c in timed.items() if c}


def _timed_dispatches(records: list[dict[str, Any]], case: str,
                      ratio: Callable[[dict], float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in records:  # dropless only: capacity mode changes the work done
        if r.get("status") == "ok" and r.get("capacity_factor") is None:
            out.setdefault(r[case], {})[r["dispatch"]] = ratio(r)
    return out


def _timed_kernels(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in records:
        case = f"{r.get('shape')} {r.get('routing')} {r.get('dtype')} {r.get('mode')}"
        for name, c in r.get("candidates", {}).items():
            if name != "dense" and c.get("status") == "ok":
                out.setdefault(case, {})[name] = c["pct_of_dense"]
    return {case: {n: 100.0 / pct for n, pct in c.items()} for case, c in out.items()}


def fastest_summary(data: dict[str, Any]) -> dict[str, Any]:
    """The JSON's `fastest` field: per grouped-matmul case, layer config and step preset,
    the fastest correct candidate (figures: time ÷ dense) against the project's default
    (the `gmm` kernel; the `sort` dispatch)."""
    return {"gmm": fastest(_timed_kernels(data["gmm"]), "gmm"),
            "layer": fastest(_timed_dispatches(data["layer"], "config",
                                               lambda r: r["fwd_bwd"]["ratio"]),
                             DEFAULT_DISPATCH),
            "step": fastest(_timed_dispatches(data["step"], "preset", lambda r: r["ratio"]),
                            DEFAULT_DISPATCH)}


def verdict_lines(data: dict[str, Any]) -> list[str]:
    """One line per grouped-matmul case, layer config and step preset: the fastest
    correct candidate, and whether the project's default should follow it."""
    lines = []
    for section, verdicts in data.get("fastest", {}).items():
        for name, v in verdicts.items():
            default = ("not timed" if v["default_ratio"] is None
                       else f"{v['default_ratio']:.2f}x")
            follow = ("the default is the fastest" if v["dispatch"] == v["default"] else
                      f"**faster than the default `{v['default']}`** ({default})"
                      + ("" if section == "gmm" else
                         ": the default on this backend should follow it"))
            lines.append(f"- {section} {name}: `{v['dispatch']}` {v['ratio']:.2f}x dense; "
                         f"{follow}")
    if lines and data.get("small"):
        lines.append("- (CPU `--small`: interpreted kernels and tiny shapes; the ratios are a "
                     "smoke test, not a finding)")
    return lines


def markdown(data: dict[str, Any], json_name: str) -> str:
    """The device's section: header line, then the three tables."""
    device, load = data["device"], data["load_average"]
    lines = [f"### {device['kind']} ({device['platform']}, {device['count']} device(s))", "",
             f"`{data['command']}`; jax {data['jax']}; {data['elapsed_s']:.0f} s"
             f"{'' if data['complete'] else ' (incomplete: stopped early)'}; "
             f"load average {load['start']} at start, {load['end']} at end; "
             f"{data['timing']['rounds']} interleaved rounds, medians of paired ratios; "
             f"raw: `{json_name}`.", "",
             "Grouped matmul (TFLOP/s of useful work, % of a dense matmul of equal FLOPs, "
             "speed-up over `jax.lax.ragged_dot`; **wrong** = failed the correctness check, "
             "not timed):", ""]
    lines += gmm_table(data["gmm"])
    lines += ["", "MoE layer forward+backward vs a dense FFN of equal active FLOPs "
              "(median ratio, min-max over rounds):", ""]
    lines += layer_table(data["layer"])
    lines += ["", "Training step, MoE preset vs the dense preset of equal active parameters:",
              ""]
    lines += step_table(data["step"])
    verdicts = verdict_lines(data)
    if verdicts:
        lines += ["", "Fastest correct candidate (time ÷ dense; layer and step dropless):", ""]
        lines += verdicts
    errors = [f"{r.get('shape', r.get('config', r.get('preset')))}/{n}: {c['error']}"
              for r in data["gmm"] for n, c in r.get("candidates", {}).items() if "error" in c]
    errors += [f"{r.get('shape')} {r.get('routing')} {r.get('mode')}: {r['error']}"
               for r in data["gmm"] if "error" in r]
    errors += [f"{r.get('config', r.get('preset'))}/{r.get('dispatch')}: {r['error']}"
               for r in data["layer"] + data["step"] if "error" in r]
    if errors:
        lines += ["", "Errors (recorded, the run went on):", ""]
        lines += [f"- {e}" for e in dict.fromkeys(errors)]
    return "\n".join(lines) + "\n"
