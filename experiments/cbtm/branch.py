"""A c-BTM branch's starting workdir: the seed run's checkpoint, its data position reset.

`branch_workdir(seed, out, step)` writes `out` (atomically) with the seed's checkpoint
at `step` (parameters, optimizer state, RNG key, hook state) and an empty data state,
the seed's config.gin and tokenizer files, and `branch.json` naming the seed. Training
in `out` then resumes at `step` as the trainer resumes any workdir, with the data
iterator of the branch's own `DataConfig.source` (e.g. `'cluster:<dir>:<i>'`) started
from its beginning: an empty data state is how the trainer starts a converted or
imported checkpoint's data (`experiments.train.run_state.start`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import optax
from flax import nnx

from experiments.convert.expert_surgery import _check_out, _read_full, write_workdir
from experiments.inference.restore import model_cls, parse_run_config
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.config import model_vocab_size
from experiments.train.optim import make_optimizer

BRANCH_FILE = "branch.json"


def branch_workdir(seed_workdir: str | Path, out_workdir: str | Path,
                   step: int | None = None) -> int:
    """Writes the branch workdir `out_workdir` from `seed_workdir`'s checkpoint at `step`
    (None: the latest); returns the step. Leaves gin with the seed's config."""
    seed, out = Path(seed_workdir).absolute(), Path(out_workdir).absolute()
    _check_out(seed, out)
    if not (seed / "checkpoints").is_dir():
        raise FileNotFoundError(f"--seed_workdir {str(seed)!r} has no checkpoints/")
    parse_run_config(seed)
    vocab_size = model_vocab_size()
    model = nnx.eval_shape(lambda: model_cls()(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
    layout = nnx.split(model, nnx.Param)[1].to_pure_dict()
    checkpointer = Checkpointer(seed / "checkpoints", read_only=True)
    try:
        step = checkpointer.pick_step(step, option="--step")
    finally:
        checkpointer.close()
    tx = make_optimizer(optax.constant_schedule(0.0))
    full = _read_full(seed, step, jax.eval_shape(lambda: layout), tx)
    record = {"seed_workdir": str(seed), "step": step}
    write_workdir(seed, out, step, dataclasses.replace(full, data_state={}), full.params,
                  full.opt_state,
                  lambda tmp: (tmp / BRANCH_FILE).write_text(json.dumps(record, indent=2) + "\n"),
                  hook_state=full.hook_state)
    return step
