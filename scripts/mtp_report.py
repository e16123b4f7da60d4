"""Report of the multi-token prediction experiment (docs/experiments/mtp.md).

  for s in 0 1 2; do python scripts/sweep.py gin_configs/sweeps/mtp.gin --seeds=$s; done
  python scripts/mtp_report.py                  # from the runs under --root
  python scripts/mtp_report.py --from_records   # from the committed records

Collects the finished runs of the mtp sweep (`experiments.reporting.sweep.collect_run`),
measures the self-speculative acceptance rate of every finished `mtp` run once
(`experiments.inference.speculative`: greedy continuations of validation prompts, cached
in <workdir>/analysis/speculative.json), writes the records (no per-step curves) to
docs/experiments/mtp/records.json and the report: next-token validation loss of `mtp`
paired by seed with `none`, judged by `experiments.reporting.protocol` at 3 standard
errors, and the acceptance rates. With `--from_records` nothing else is read.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from experiments.reporting import protocol
from experiments.reporting import sweep as sweep_lib
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import cli

SWEEP = "gin_configs/sweeps/mtp.gin"
DOCS = Path("docs/experiments")
NAME = "mtp"
THRESHOLD = 3.0
PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 64  # acceptance: validation prompts, greedy


def acceptance(workdir: Path) -> dict[str, Any]:
    """The run's self-speculative statistics on validation prompts (cached)."""
    cache = workdir / "analysis" / "speculative.json"
    if cache.exists():
        return json.loads(cache.read_text())
    # pylint: disable=g-import-not-at-top
    import gin

    from experiments.data.config import DataConfig
    from experiments.data.sharded import eval_batches
    from experiments.inference import restore as restore_lib
    from experiments.inference.speculative import SpeculativeGenerator

    restored = restore_lib.restore_model(workdir)
    batch = eval_batches(DataConfig())[0]
    gin.clear_config()
    segments = batch["segment_ids"][:, :PROMPT_LEN]
    rows = [i for i in range(len(segments)) if np.all(segments[i] == segments[i, 0])
            and segments[i, 0] > 0][:PROMPTS]
    prompts = [batch["inputs"][i, :PROMPT_LEN].tolist() for i in rows]
    generator = SpeculativeGenerator(restored)
    generator.generate(prompts, max_new_tokens=NEW_TOKENS)
    stats = dict(generator.last_speculative.as_dict(), prompt_tokens=PROMPT_LEN,
                 step=restored.step)
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1) + "\n")
    tmp.rename(cache)
    return stats


def teacher_forced(workdir: Path, num_batches: int = 2) -> dict[str, Any]:
    """Draft quality on real text (cached): at every position i of the first
    `num_batches` validation batches whose tokens i..i+2 share a document, does the MTP
    draft of t_{i+2} (from h_i and t_{i+1}) equal the main model's greedy prediction of
    t_{i+2} given t_0..t_{i+1} (the acceptance rate if decoding followed the text), and
    how often is each right."""
    cache = workdir / "analysis" / "teacher_forced.json"
    if cache.exists():
        return json.loads(cache.read_text())
    # pylint: disable=g-import-not-at-top
    import gin
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.data.config import DataConfig
    from experiments.data.sharded import eval_batches
    from experiments.inference import restore as restore_lib
    from layers.attention import attention_mask, segment_positions
    from layers.mtp import mtp_targets

    restored = restore_lib.restore_model(workdir)
    batches = eval_batches(DataConfig())[:num_batches]
    gin.clear_config()

    @jax.jit
    def counts(params, inputs, segments):
        model = nnx.merge(restored.graphdef, params, restored.rest)
        call = dict(positions=segment_positions(segments), token_mask=segments > 0,
                    mask=attention_mask(segments, causal=True), deterministic=True)
        x = model.embed(inputs)
        for _, block in model.unrolled_blocks():  # the forward of TransformerLM, unscanned
            x, _ = block(x, rng=None, router_state={}, **call)
        h = model.final_norm(x)
        main = jnp.argmax(model.head(h), axis=-1)          # [B, S]: prediction of t_{i+1}
        mod = model.mtp.module(1)
        y, _ = mod.block(mod.combine(h, model.embed(jnp.roll(inputs, -1, axis=1))), rng=None,
                         router_state={}, **call)
        draft = jnp.argmax(model.head(mod.norm(y)), axis=-1)  # [B, S]: of t_{i+2}
        target, valid = mtp_targets(inputs, segments, 1)
        main_next = jnp.roll(main, -1, axis=1)               # main's prediction of t_{i+2}
        return (jnp.sum(valid), jnp.sum(valid & (draft == main_next)),
                jnp.sum(valid & (draft == target)), jnp.sum(valid & (main_next == target)))

    totals = np.zeros(4)
    for batch in batches:
        totals += np.asarray([float(v) for v in counts(
            restored.params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]))])
    n = max(totals[0], 1.0)
    stats = {"positions": int(totals[0]), "agreement": totals[1] / n,
             "draft_accuracy": totals[2] / n, "main_accuracy": totals[3] / n,
             "step": restored.step}
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1) + "\n")
    tmp.rename(cache)
    return stats


def collect(root: Path) -> list[dict[str, Any]]:
    sweep = sweep_lib.load_sweep(SWEEP)
    records = []
    for variant, _ in sweep.runs():
        for seed in sweep.seeds:
            workdir = sweep_lib.run_dir(root, sweep, variant, seed)
            if not (workdir / "summary.json").exists():
                continue
            record = sweep_lib.collect_run(workdir, variant, seed, root=root)
            record.pop("curves")
            train = read_jsonl(workdir / "metrics.jsonl", "train")
            last = [r for r in train if r["step"] > train[-1]["step"] - 50]
            record["train_ce_last50"] = float(np.mean([r["ce"] for r in last]))
            if variant == "mtp":
                record["mtp_loss_last50"] = float(np.mean([r["mtp/loss_depth_1"] for r in last]))
                record["speculative"] = acceptance(workdir)
                record["teacher_forced"] = teacher_forced(workdir)
            records.append(record)
    return records


def _fmt(values: list[float], digits: int = 4) -> str:
    return protocol.mean_std(values, digits)


def report(records: list[dict[str, Any]]) -> str:
    sweep = sweep_lib.load_sweep(SWEEP)
    runs = protocol.by_variant(records)
    lines = [f"# {sweep.title}", "", sweep.description.strip(), "",
             f"Sweep: `{SWEEP}`; report: `scripts/mtp_report.py` (`--from_records` rewrites "
             f"it from `docs/experiments/{NAME}/records.json`).", "",
             "## Runs", "", *protocol.run_table(records), "",
             "| variant | seed | train CE, last 50 steps | MTP CE (depth 1), last 50 steps | "
             "acceptance | tokens / main-model call |", "|---|---|---|---|---|---|"]
    for r in records:
        spec = r.get("speculative") or {}
        lines.append(f"| `{r['variant']}` | {r['seed']} | {r['train_ce_last50']:.4f} | "
                     f"{r['mtp_loss_last50']:.4f} | " if "mtp_loss_last50" in r else
                     f"| `{r['variant']}` | {r['seed']} | {r['train_ce_last50']:.4f} | - | ")
        lines[-1] += (f"{spec['acceptance_rate']:.3f} ({spec['accepted']}/{spec['drafts']}) | "
                      f"{spec['tokens_per_step']:.2f} |" if spec else "- | - |")
    lines += ["", "## Next-token validation loss, paired by seed", "",
              *protocol.variant_table(records, baseline="none", threshold=THRESHOLD), ""]
    if "mtp" in runs and "none" in runs:
        p = protocol.paired(records, "mtp", "none")
        per_seed = ", ".join(f"seed {s}: {d:+.4f}" for s, d in zip(p.seeds, p.diffs))
        lines += [f"Per seed (mtp - none): {per_seed or 'no pairs yet'}.", "",
                  f"**Claim \"MTP lowers the next-token validation loss\"**: "
                  f"{protocol.verdict(p, THRESHOLD).text()}", ""]
    rates = [r["speculative"]["acceptance_rate"] for r in runs.get("mtp", {}).values()
             if r.get("speculative")]
    if rates:
        lines += ["## Self-speculative decoding", "",
                  f"Acceptance rate of the MTP head's draft (greedy verification by the main "
                  f"model, {PROMPTS} validation prompts of {PROMPT_LEN} bytes, {NEW_TOKENS} new "
                  f"bytes each): {_fmt(rates, 3)} (mean ± std over {len(rates)} seed(s)); "
                  f"per seed {', '.join(f'{x:.3f}' for x in rates)}.", ""]
    forced = [(r["seed"], r["teacher_forced"]) for r in runs.get("mtp", {}).values()
              if r.get("teacher_forced")]
    if forced:
        lines += ["On validation text instead of the model's own continuations (teacher "
                  "forcing: at each position i with i+2 in the same document, the MTP draft "
                  "of byte i+2 against the main model's greedy prediction of it given bytes "
                  "0..i+1, over the first 2 validation batches):", "",
                  "| seed | positions | agreement (= acceptance) | draft = true byte | "
                  "main greedy = true byte |", "|---|---|---|---|---|"]
        lines += [f"| {seed} | {t['positions']} | {t['agreement']:.3f} | "
                  f"{t['draft_accuracy']:.3f} | {t['main_accuracy']:.3f} |" for seed, t in forced]
        lines += ["", f"Agreement {_fmt([t['agreement'] for _, t in forced], 3)} (mean ± std "
                  f"over seeds).", ""]
    done = {v: sorted(s) for v, s in runs.items()}
    lines += ["## Status", "", f"Finished runs: {json.dumps(done)} of seeds "
              f"{list(sweep.seeds)}.", ""]
    if sweep.findings.strip():
        lines += ["## Findings", "", sweep.findings.strip(), ""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="workdirs/sweeps", help="the sweep root")
    parser.add_argument("--docs_dir", default=str(DOCS), help="where the report goes")
    parser.add_argument("--from_records", action="store_true",
                        help="rewrite the report from DOCS_DIR/mtp/records.json only")
    args = parser.parse_args(argv)
    docs = Path(args.docs_dir)
    records_path = docs / NAME / sweep_lib.RECORDS_FILE
    if args.from_records:
        if not records_path.is_file():
            cli.fail(f"--from_records: {records_path} not found")
        records = json.loads(records_path.read_text())
    else:
        records = collect(Path(args.root).absolute())
        if not records:
            cli.fail(f"--root: no finished run of the mtp sweep under {args.root}")
        _write(records_path, json.dumps(records, indent=1, default=float) + "\n")
    _write(docs / f"{NAME}.md", report(records))
    print(f"wrote {docs / f'{NAME}.md'} ({len(records)} runs)")
    return 0 if all(math.isfinite(protocol.final_loss(r)) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
