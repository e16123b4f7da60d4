"""One-call accelerator benchmark: grouped matmuls, the MoE layer and a training step.

  python scripts/bench_accelerator.py            # on a GPU or TPU (make bench-accel)
  python scripts/bench_accelerator.py --small    # CPU smoke run (CI, under a minute)

Finds the backend jax runs on (GPU, TPU; CPU only with --small) and, within
--budget_s seconds (default 420, so 8 minutes with start-up), measures:

  gmm    grouped matmul forward and forward+backward (bf16; f32 on CPU) at
         Mixtral-like, OLMoE/DeepSeek-like fine-grained and small shapes, uniform
         and skewed routing: moe.kernels.gmm (Pallas), the fused dispatch's
         row-gathering gmm, jax.lax.ragged_dot, megablox (TPU), tokamax (if
         installed), and a dense matmul of equal useful FLOPs;
  layer  MoeLayer forward+backward vs a dense FFN of equal active FLOPs, per dispatch
         (pallas vs pallas_fused vs tokamax: which dispatch is faster on the device);
  step   a training step of an MoE preset vs the dense preset of equal active
         parameters, with MFU where the device's peak is known.

Every candidate is first checked against an XLA reference (outputs and
gradients); a wrong one is reported as "wrong" and not timed. A candidate, shape
or section that fails is recorded with its error and the run goes on. Progress
goes to stdout; the JSON (--json) is rewritten after every case; at the end the
device's section of --doc (docs/benchmarks.md) is replaced. SIGTERM (from
`timeout`) stops the measuring and still writes both, marked incomplete. Exit
status 0 even when cases failed (they are in the JSON); 1 when stopped by
SIGTERM; 2 for bad flags or no accelerator without --small.
"""

from __future__ import annotations

import argparse
import platform as platform_lib
import re
import shlex
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jaxlib

from experiments.bench import gmm, layer, report, step, timing
from experiments.bench.budget import Budget, error_text, past
from experiments.runtime import cli
from moe.dispatch import available_dispatches
from moe.dispatch.registry import unavailable

SECTIONS = ("gmm", "layer", "step")
SHARES = {"gmm": 0.45, "layer": 0.45, "step": 1.0}  # of the time left when the section starts
FULL_LAYER = dict(tokens=16384, d_model=2048, configs=(layer.LayerConfig("E8_k2", 8, 2, 4096),
                                                       layer.LayerConfig("E64_k8", 64, 8, 1024)))
SMALL_LAYER = dict(tokens=256, d_model=32, configs=(layer.LayerConfig("E8_k2", 8, 2, 32),))
FULL_STEP = dict(batch_size=16, seq_len=1024, vocab=32768, reference="sort")
# --small: the tiny presets shrunk further (2 layers, d_model 32), so compiling is quick.
SMALL_STEP = dict(batch_size=2, seq_len=32, vocab=256, reference="einsum",
                  bindings=("TransformerLM.num_layers = 2", "TransformerLM.d_model = 32",
                            "TransformerLM.d_ff = 64", "MoeLayer.d_ff = 32"))


def _platform() -> str:
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="CPU-sized shapes (the only mode on CPU; a smoke run elsewhere)")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default docs/bench_accelerator_<device>.json)")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown file whose section for this device is replaced")
    parser.add_argument("--no_doc", action="store_true", help="write only the JSON")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="seconds for all measurements (cases past it are recorded "
                             "as skipped)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds "
                        "(default 5; 3 with --small)")
    parser.add_argument("--min_time", type=float, default=None,
                        help="seconds per timed measurement: calls are repeated to last this "
                             "long (default 0.05; 0.002 with --small)")
    parser.add_argument("--dtypes", default=None,
                        help="gmm dtypes, comma-separated (default bfloat16; float32 on CPU)")
    parser.add_argument("--tolerance_scale", type=float, default=1.0,
                        help="multiplies every correctness tolerance")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"--sections: {s!r} is not one of {','.join(SECTIONS)}")
    args.sections = tuple(sections)
    if not args.budget_s > 0:
        parser.error(f"--budget_s must be > 0, got {args.budget_s}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not args.tolerance_scale > 0:
        parser.error(f"--tolerance_scale must be > 0, got {args.tolerance_scale}")
    for d in (args.dtypes or "").split(","):
        if d and d not in ("bfloat16", "float32"):
            parser.error(f"--dtypes: {d!r} is not one of bfloat16,float32")
    if not args.no_doc and not args.doc.is_file():
        parser.error(f"--doc: {str(args.doc)!r} is not a file (or pass --no_doc)")
    args.rounds = args.rounds or (3 if args.small else 5)
    args.min_time = args.min_time if args.min_time is not None else (
        0.002 if args.small else 0.05)
    return args


class Run:
    """The results being gathered, saved after every case."""

    def __init__(self, args: argparse.Namespace, platform: str, argv: list[str] | None):
        device = jax.devices()[0]
        self.args, self.platform = args, platform
        self.budget = Budget(args.budget_s)
        slug = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
        self.json_path = args.json or Path(f"docs/bench_accelerator_{slug}.json")
        command = "python scripts/bench_accelerator.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)
        self.data = dict(
            schema=1, command=command.strip(), small=args.small,
            device=dict(kind=device.device_kind, platform=platform, count=jax.device_count()),
            jax=jax.__version__, jaxlib=jaxlib.__version__, host=platform_lib.node(),
            load_average=dict(start=timing.load_average(), end=None),
            budget_s=args.budget_s, elapsed_s=0.0,
            timing=dict(rounds=args.rounds, min_time_s=args.min_time,
                        method="warm-up excluded; interleaved rounds; medians of per-round "
                               "paired ratios"),
            optional={}, gmm=[], layer=[], step=[], fastest={}, complete=False)

    def save(self) -> None:
        self.data["elapsed_s"] = self.budget.elapsed()
        self.data["load_average"]["end"] = timing.load_average()
        report.write_json(self.json_path, self.data)

    def add(self, section: str, record: dict, line: str) -> None:
        self.data[section].append(record)
        print(f"[{self.budget.elapsed():6.1f}s] {line}", flush=True)
        self.save()


def run_gmm(run: Run) -> None:
    args, platform = run.args, run.platform
    deadline = run.budget.section_deadline(SHARES["gmm"])
    cands = gmm.candidates(platform, args.small)
    run.data["optional"] = {n: c.unavailable or "available" for n, c in cands.items()
                            if n in ("megablox", "tokamax", "gmm_pallas_interpret",
                                     "pallas_fused_gather")}
    default = "float32" if platform == "cpu" else "bfloat16"
    dtypes = [d for d in (args.dtypes or default).split(",") if d]
    cases = ([(s, r) for s in gmm.FULL_SHAPES for r in gmm.ROUTINGS] if not args.small else
             list(zip(gmm.SMALL_SHAPES, gmm.ROUTINGS)))  # --small: one routing per shape
    for dtype in dtypes:
        tol = gmm.tolerance(dtype, platform, args.tolerance_scale)
        for shape, routing in cases:
            for mode in gmm.MODES:
                if past(deadline):
                    record = dict(shape=shape.name, routing=routing, mode=mode, dtype=dtype,
                                  status="skipped", reason="time budget")
                    run.add("gmm", record, f"gmm {shape.name} {routing} {mode}: skipped")
                    continue
                try:
                    record = gmm.run_case(shape, routing, dtype, mode, cands,
                                          rounds=args.rounds, min_time=args.min_time, tol=tol,
                                          seed=args.seed)
                    line = gmm.summary_line(record)
                except Exception as e:  # e.g. the inputs do not fit: recorded, next case
                    record = dict(shape=shape.name, routing=routing, mode=mode, dtype=dtype,
                                  status="error", error=error_text(e))
                    line = f"gmm {shape.name} {routing} {mode}: error ({error_text(e)})"
                run.add("gmm", record, line)


def _layer_tolerance(dtype: str, platform: str, scale: float) -> float:
    return scale * (5e-2 if dtype == "bfloat16" else 1e-4 if platform == "cpu" else 2e-2)


def run_layer(run: Run) -> None:
    args, platform = run.args, run.platform
    deadline = run.budget.section_deadline(SHARES["layer"])
    sizes = SMALL_LAYER if args.small else FULL_LAYER
    dtype = "float32" if platform == "cpu" else "bfloat16"
    tol = _layer_tolerance(dtype, platform, args.tolerance_scale)
    dispatches = [d for d in available_dispatches() if d not in ("einsum", "expert_parallel")]
    variants = [(d, None) for d in dispatches] + [("sort", 1.25)]
    for config in sizes["configs"]:
        x = jax.random.normal(jax.random.key(args.seed), (sizes["tokens"], sizes["d_model"]))
        try:
            dense = layer.dense_baseline(config, x, dtype)
            references = {cf: layer.reference_outputs(config, x, cf)
                          for cf in dict.fromkeys(cf for _, cf in variants)}
        except Exception as e:
            for dispatch, cf in variants:
                run.add("layer", dict(config=config.name, dispatch=dispatch, capacity_factor=cf,
                                      status="error", error=error_text(e)),
                        f"layer {config.name} {dispatch}: error ({error_text(e)})")
            continue
        for dispatch, cf in variants:
            reason = unavailable(dispatch)  # an optional extra not installed
            if reason:
                run.add("layer", dict(config=config.name, dispatch=dispatch, capacity_factor=cf,
                                      status="unavailable", reason=reason),
                        f"layer {config.name} {dispatch}: unavailable ({reason})")
                continue
            if past(deadline):
                run.add("layer", dict(config=config.name, dispatch=dispatch, capacity_factor=cf,
                                      status="skipped", reason="time budget"),
                        f"layer {config.name} {dispatch} cf={cf}: skipped")
                continue
            record = layer.run_config(config, dispatch, cf, x=x, dtype=dtype,
                                      rounds=args.rounds, min_time=args.min_time, tol=tol,
                                      reference=references[cf], dense=dense)
            run.add("layer", record, layer.summary_line(record))


def run_step(run: Run) -> None:
    args, platform = run.args, run.platform
    deadline = run.budget.section_deadline(SHARES["step"])
    sizes = dict(SMALL_STEP if args.small else FULL_STEP)
    reference = sizes.pop("reference")
    tol = args.tolerance_scale * (1e-4 if platform == "cpu" else 2e-2)
    dispatches = ("sort",) if platform == "cpu" else tuple(
        d for d in ("sort", "pallas", "pallas_fused", "ragged_dot", "tokamax")
        if unavailable(d) is None)
    for pair in (step.SMALL_PAIRS if args.small else step.FULL_PAIRS):
        if past(deadline):
            records = step.timed_out(pair, dispatches)
        else:
            records = step.run_pair(pair, dispatches, reference, rounds=args.rounds,
                                    min_time=args.min_time, tol=tol, deadline=deadline, **sizes)
        for record in records:
            run.add("step", record, step.summary_line(record))


class Stopped(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write what was measured."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


def _complete(data: dict) -> bool:
    records = data["gmm"] + data["layer"] + data["step"]
    return not any(r.get("status") == "skipped" for r in records)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    platform = _platform()
    if platform == "cpu" and not args.small:
        cli.fail("no accelerator found (jax runs on cpu): pass --small for the CPU smoke run")
    run = Run(args, platform, argv)
    device = run.data["device"]
    print(f"bench_accelerator: {device['kind']} ({platform}, {device['count']} device(s)), "
          f"jax {jax.__version__}, budget {args.budget_s:.0f} s, sections "
          f"{','.join(args.sections)}, load average {run.data['load_average']['start']}",
          flush=True)
    run.save()
    signal.signal(signal.SIGTERM, _stop)
    stopped = None
    try:
        for name, fn in (("gmm", run_gmm), ("layer", run_layer), ("step", run_step)):
            if name not in args.sections:
                continue
            try:
                fn(run)
            except Exception as e:  # a section's own failure; the others still run
                run.add(name, dict(status="error", error=error_text(e)),
                        f"{name}: section error ({error_text(e)})")
    except Stopped as e:  # partial results are still written, marked incomplete
        stopped = str(e)
        print(f"{stopped}: writing the results measured so far", flush=True)
    run.data["complete"] = stopped is None and _complete(run.data)
    run.data["fastest"] = report.fastest_summary(run.data)
    run.save()
    if not args.no_doc:
        key = report.section_key(device["kind"], platform, args.small)
        report.write_doc(args.doc, key, report.markdown(run.data, run.json_path.name), platform)
        print(f"wrote {run.json_path} and the section {key!r} of {args.doc}")
    else:
        print(f"wrote {run.json_path}")
    return 0 if stopped is None else 1


if __name__ == "__main__":
    sys.exit(main())
