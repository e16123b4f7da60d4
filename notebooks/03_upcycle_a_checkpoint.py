# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Upcycle a dense checkpoint into an MoE
#
# Sparse upcycling: train a small dense LM, turn every other FFN into a mixture of
# experts initialised from it (`experiments.convert.upcycle_checkpoint`, the code behind
# `scripts/upcycle.py`), check that the upcycled model computes the same function
# as the dense one, then keep training both and compare.
#
# `NB_SMOKE=1` runs a micro model for a few steps (the CI runs it that way).

# %%
# Set-up. In a fresh Colab runtime (pick it first: Runtime > Change runtime type: TPU or GPU)
# this fetches the repository and installs it with the JAX build for the runtime
# (experiments/runtime/colab.py); elsewhere it only finds the checkout. docs/notebooks.md.
import os
import subprocess
import sys
from pathlib import Path

if "google.colab" in sys.modules and not Path("setup.py").exists():
    if not Path("sparse-moe").is_dir():  # not uploaded as ./sparse-moe: clone it
        REPO_URL = os.environ.get("SPARSE_MOE_REPO_URL", "")  # git URL of this repository
        if not REPO_URL:
            raise RuntimeError("Set SPARSE_MOE_REPO_URL (os.environ) to this repository's git "
                               "URL, or upload the repository as ./sparse-moe (see "
                               "docs/notebooks.md).")
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, "sparse-moe"], check=True)
    os.chdir("sparse-moe")
# The repository root (this notebook lives in notebooks/), importable from here.
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "setup.py").exists())
sys.path.insert(0, str(ROOT))
from experiments.runtime import colab  # noqa: E402  (standard library only: safe before JAX)

colab.install(ROOT)

# %%
import tempfile  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from experiments.convert.upcycle_checkpoint import UpcycleConfig, upcycle  # noqa: E402
from experiments.reporting.metrics import read_jsonl  # noqa: E402
from experiments.runtime import gin_utils  # noqa: E402
from experiments.train.trainer import train  # noqa: E402

# One variable sets every size: "smoke" (CI, about 1 min on CPU) or "full" (~6 min
# of CPU time on 2 cores; seconds on an accelerator).
SIZE = "smoke" if os.environ.get("NB_SMOKE") == "1" else "full"
CFG = {
    "smoke": dict(gin_file="test_tiny.gin", dense_steps=8, total_steps=16, batch_size=8,
                  num_experts=4, eval_every=4, log_every=4),
    "full": dict(gin_file="default.gin", dense_steps=200, total_steps=400, batch_size=16,
                 num_experts=8, eval_every=50, log_every=25),
}[SIZE]
print(f"SIZE={SIZE}: {CFG}")
print("devices:", jax.devices())
num_devices = jax.device_count()
batch_size = -(-CFG["batch_size"] // num_devices) * num_devices
WORK = Path(os.environ.get("NB_WORKDIR") or tempfile.mkdtemp(prefix="sparse_moe_nb03_"))
DENSE, MOE = WORK / "dense", WORK / "upcycled"
print("workdirs:", DENSE, MOE)

# %% [markdown]
# ## 1. Train a dense model
#
# The experiment's model with `TransformerLM.moe_every = 0`: every FFN dense.
# `MESH_SHAPE = {'data': -1}` trains on every device present (data parallel).

# %%
common = [
    f"train.eval_every = {CFG['eval_every']}",
    f"train.log_every = {CFG['log_every']}",
    "train.num_microbatches = 1",
    "Checkpointer.async_save = False",
    f"DataConfig.batch_size = {batch_size}",
    f"DataConfig.eval_batch_size = {batch_size}",
    "MESH_SHAPE = {'data': -1}",
]
gin.clear_config()
gin_utils.parse([str(ROOT / "gin_configs" / "experiments" / CFG["gin_file"])],
                [*common, "TransformerLM.moe_every = 0",
                 f"train.num_steps = {CFG['dense_steps']}",
                 f"Checkpointer.save_every = {CFG['dense_steps']}"])
dense_summary = train(DENSE, quiet=True)
print("dense validation loss:", dense_summary["valid_loss"])

# %% [markdown]
# ## 2. Upcycle, and check that the function is preserved
#
# Every other FFN (layers 1, 3, ...) becomes an MoE layer of E experts, top-2,
# each expert a slice of the dense FFN (virtual groups when the expert hidden size
# is a fraction of the dense one), with renormalised top-k weights, so at
# initialisation the MoE computes exactly the dense function; `verify=True` runs
# both models on validation batches and reports the largest logit difference.
# `gin_params` go on top of the dense run's config: the router's options are bindings
# on the router class (`TopKRouter.normalize`), dispatch and capacity on `MoeLayer`.
# With `mesh_shape={'expert': n}` the expert weights are written sharded over an
# `expert` mesh axis.

# %%
expert_shards = num_devices if num_devices > 1 and CFG["num_experts"] % num_devices == 0 else None
result = upcycle(
    DENSE, MOE,
    gin_params=["MoeLayer.router = @TopKRouter", "TopKRouter.normalize = True",
                "MoeLayer.dispatch = 'sort'", "MoeLayer.capacity_factor = None"],
    config=UpcycleConfig(moe_layers="every_other", num_experts=CFG["num_experts"], k=2,
                         mesh_shape={"expert": expert_shards} if expert_shards else None),
    verify=True)
print(f"MoE layers {list(result.moe_layers)}, E={result.num_experts}, k={result.k}, "
      f"G={result.granularity}; parameters {result.dense_param_count:,} -> "
      f"{result.moe_param_count:,}")
print(result.verify.render())
assert result.verify.ok, "the upcycled model does not reproduce the dense one"

# %% [markdown]
# ## 3. Keep training both
#
# The upcycled workdir holds a checkpoint at the dense step and its `config.gin`;
# training resumes from it (same data position and RNG key). The dense run also
# continues from the same step with the same schedule, as the baseline.

# %%
def continue_run(workdir: Path) -> dict:
    gin.clear_config()
    gin_utils.parse([str(workdir / "config.gin")],
                    [*common, f"train.num_steps = {CFG['total_steps']}",
                     f"Checkpointer.save_every = {CFG['total_steps']}"])
    return train(workdir, quiet=True)


moe_summary = continue_run(MOE)
dense_summary = continue_run(DENSE)
for name, s in (("dense", dense_summary), ("upcycled", moe_summary)):
    print(f"{name:<9} validation loss {s['valid_loss']['all']:.4f}")
print("upcycled expert load:",
      {layer: [round(x, 3) for x in info["load"]] for layer, info in moe_summary["moe"].items()})

# %% [markdown]
# ## 4. Dense vs upcycled
#
# Training cross-entropy (nats per token) from the upcycling step on, and the
# validation loss. The curves start together (the same function) and then part
# as the experts specialise.

# %%
fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(12, 3.5))
for name, workdir in (("dense", DENSE), ("upcycled", MOE)):
    records = [r for r in read_jsonl(workdir / "metrics.jsonl", "train")
               if r["step"] > CFG["dense_steps"]]
    ax_train.plot([r["step"] for r in records], [r["ce"] for r in records], lw=1, label=name)
    valid = read_jsonl(workdir / "metrics.jsonl", "valid")
    ax_valid.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label=name)
ax_train.axvline(CFG["dense_steps"], color="k", ls=":", lw=1)
ax_valid.axvline(CFG["dense_steps"], color="k", ls=":", lw=1, label="upcycled here")
ax_train.set_title("train CE after upcycling")
ax_valid.set_title("validation loss")
for ax in (ax_train, ax_valid):
    ax.set_xlabel("step")
    ax.legend()
plt.show()
moe_train = read_jsonl(MOE / "metrics.jsonl", "train")
assert [r["step"] for r in moe_train] == list(range(CFG["dense_steps"] + 1,
                                                    CFG["total_steps"] + 1))
assert all(r["lbl"] > 0 for r in moe_train)  # the new MoE layers route
