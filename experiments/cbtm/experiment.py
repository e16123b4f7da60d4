"""The c-BTM experiment's runs (scripts/cbtm_experiment.py; docs/experiments/cbtm.md).

Per seed s and number of clusters k (k = 1 is the dense baseline: one "branch" on
the whole corpus):

  seed run     research preset, dense of equal active parameters
               (research.gin + research_dense_active.gin), train.seed = s, 500 steps
               (or an existing run of exactly that config, --seed_runs), branched at
               its last step;
  clustering   clusters/k<k>_seed<s>: scripts/cluster_corpus.py --clusters k --seed s;
  branches     k<k>/seed<s>/branch<j>: the seed run's checkpoint
               (experiments.cbtm.branch), trained budget/k more steps on cluster j
               (DataConfig.source = 'cluster:<clustering>:<j>') at a constant
               learning rate: every k gets the same total training compute;
  ensemble     k<k>/seed<s>/ensemble.json: scripts/ensemble_eval.py over the branches.

Everything already finished is skipped (a summary.json, an ensemble.json, a complete
clustering), and an interrupted branch resumes from its checkpoint, so rerunning the
same command continues the experiment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.runtime import cli
from experiments.train.resume_check import parse_bindings

REPO = Path(__file__).resolve().parents[2]
SEED_GIN = ("gin_configs/experiments/research.gin", "gin_configs/models/research_dense_active.gin")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The experiment's settings (the driver's flags)."""

    root: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    clusters: tuple[int, ...] = (1, 2, 4, 8)
    budget: int = 160  # branch-phase steps, summed over a k's branches
    learning_rate: float = 3e-4  # constant in the branch phase (the seed run's final rate)
    seed_runs: Path | None = None  # <seed_runs>/seed<s> = an existing seed run
    prefix_tokens: int = 32
    temperature: float = 0.1
    branch_eval_batches: int = 2  # the branch runs' own evaluation (not the reported one)

    def __post_init__(self):
        for k in self.clusters:
            if k < 1 or self.budget % k:
                raise ValueError(f"--clusters {k}: every k must be >= 1 and divide --budget "
                                 f"{self.budget} (equal compute per k)")

    def seed_run(self, seed: int) -> Path:
        base = self.seed_runs if self.seed_runs is not None else self.root / "seed_runs"
        return base / f"seed{seed}"

    def clustering(self, k: int, seed: int) -> Path:
        return self.root / "clusters" / f"k{k}_seed{seed}"

    def arm(self, k: int, seed: int) -> Path:
        return self.root / f"k{k}" / f"seed{seed}"


def _python(script: str, *args: str, env: dict[str, str]) -> None:
    command = [sys.executable, str(REPO / script), *args]
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=REPO, env=env, check=False).returncode
    if code != 0:  # the child printed its own error; rerunning the driver resumes
        raise cli.CliError(f"{script} failed with exit status {code}; rerun the same "
                           f"command to resume", exit_code=code)


def _env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # The branches compile the same programs: a persistent cache saves the recompiles.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(plan.root / ".xla_cache"))
    return env


def _finished(workdir: Path) -> bool:
    return (workdir / "summary.json").is_file()


def ensure_seed_run(plan: Plan, seed: int, env: dict[str, str]) -> Path:
    run = plan.seed_run(seed)
    if not _finished(run):
        if plan.seed_runs is not None:
            raise FileNotFoundError(f"--seed_runs: {run} is not a finished run")
        _python("scripts/train.py", *(f"--gin_file={g}" for g in SEED_GIN), "--quiet",
                f"--gin_param=train.seed = {seed}", f"--workdir={run}", env=env)
    return run


def seed_step(run: Path) -> int:
    """The step a finished seed run ended at (its summary)."""
    return int(json.loads((run / "summary.json").read_text(encoding="utf-8"))["step"])


def branch_params(plan: Plan, clustering: Path, j: int, k: int, start: int) -> list[str]:
    """The branch run's gin bindings on top of the seed's config.gin (from step `start`)."""
    steps = plan.budget // k
    return [f"DataConfig.source = 'cluster:{clustering.absolute()}:{j}'",
            f"train.num_steps = {start + steps}",
            f"train.eval_every = {steps}", f"train.log_every = {max(1, steps // 4)}",
            f"Checkpointer.save_every = {steps}",
            f"DataConfig.eval_max_batches = {plan.branch_eval_batches}",
            "learning_rate_schedule.warmup_steps = 0",
            f"learning_rate_schedule.peak_learning_rate = {plan.learning_rate}",
            "learning_rate_schedule.end_ratio = 1.0"]


def run_arm(plan: Plan, k: int, seed: int, env: dict[str, str]) -> None:
    """Clustering, branches and ensemble evaluation of k clusters at `seed`."""
    clustering = _cluster(plan, k, seed, env)
    arm = plan.arm(k, seed)
    branches = [arm / f"branch{j}" for j in range(k)]
    start = seed_step(plan.seed_run(seed))
    for j, branch in enumerate(branches):
        if _finished(branch):
            continue
        if not branch.exists():
            _python("scripts/branch_checkpoint.py", f"--seed_workdir={plan.seed_run(seed)}",
                    f"--out_workdir={branch}", f"--step={start}", env=env)
        _python("scripts/train.py", f"--workdir={branch}", "--quiet",
                *(f"--gin_param={p}" for p in branch_params(plan, clustering, j, k, start)), env=env)
    out = arm / "ensemble.json"
    if not out.is_file():
        top_k = ",".join(str(t) for t in (1, 2, 4, 8) if t <= k)
        _python("scripts/ensemble_eval.py", f"--clusters={clustering}",
                *(f"--branch={b}" for b in branches), f"--top_k={top_k}",
                f"--temperature={plan.temperature}", f"--prefix_tokens={plan.prefix_tokens}",
                *_eval_batches_flag(plan.seed_run(seed)), f"--json={out}", env=env)


def _data_flags(run: Path) -> list[str]:
    """cluster_corpus.py flags for the corpus the run trained on (its config.gin)."""
    bindings = parse_bindings((run / "config.gin").read_text(encoding="utf-8"))
    flags = []
    for name in ("max_bytes_per_domain", "validation_fraction"):
        if f"DataConfig.{name}" in bindings:
            flags.append(f"--{name}={bindings[f'DataConfig.{name}']}")
    return flags


def _eval_batches_flag(run: Path) -> list[str]:
    """`--eval_max_batches` of the seed run's own validation, passed to every ensemble_eval:
    without it the evaluation would take the first branch's setting, which
    `branch_eval_batches` makes much smaller, and the arms would be scored on other
    tokens than the seed checkpoint."""
    bindings = parse_bindings((run / "config.gin").read_text(encoding="utf-8"))
    value = bindings.get("DataConfig.eval_max_batches")
    return [] if value in (None, "None") else [f"--eval_max_batches={value}"]


def _cluster(plan: Plan, k: int, seed: int, env: dict[str, str]) -> Path:
    clustering = plan.clustering(k, seed)
    if not (clustering / "clusters.json").is_file():
        _python("scripts/cluster_corpus.py", f"--clusters={k}", f"--seed={seed}",
                f"--out={clustering}", *_data_flags(plan.seed_run(seed)), env=env)
    return clustering


def evaluate_seed(plan: Plan, seed: int, seed_run: Path, env: dict[str, str]) -> None:
    """The seed checkpoint itself on the scored tokens (the start of every arm)."""
    out = plan.root / "seed_eval" / f"seed{seed}.json"
    if not out.is_file():
        _python("scripts/ensemble_eval.py", f"--clusters={_cluster(plan, 1, seed, env)}",
                f"--branch={seed_run}", "--top_k=1", f"--prefix_tokens={plan.prefix_tokens}",
                *_eval_batches_flag(seed_run), f"--json={out}", env=env)


def run(plan: Plan) -> None:
    """Every seed in turn (all k at the first seed first), skipping what is done."""
    env = _env(plan)
    for seed in plan.seeds:
        seed_run = ensure_seed_run(plan, seed, env)
        evaluate_seed(plan, seed, seed_run, env)
        for k in plan.clusters:
            run_arm(plan, k, seed, env)
            print(json.dumps({"done": f"k{k} seed{seed}"}), flush=True)
