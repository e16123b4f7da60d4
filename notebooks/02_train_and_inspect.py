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
# # 02 · Train a tiny MoE LM and look inside
#
# Train a small top-2 MoE language model on the embedded corpus (Python's standard
# library: a `code` and a `prose` domain) from the gin configs, inside the notebook,
# then plot the loss and the expert load, open TensorBoard, and draw the
# domain × expert routing heat map.
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
import json  # noqa: E402
import tempfile  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.reporting.metrics import read_jsonl  # noqa: E402
from experiments.reporting.routing_report import analyze_workdir  # noqa: E402
from experiments.runtime import gin_utils  # noqa: E402
from experiments.train.trainer import train  # noqa: E402

# One variable sets every size: "smoke" (CI, < 1 min on CPU) or "full" (~3 min on 2
# CPU cores; seconds on an accelerator).
SIZE = "smoke" if os.environ.get("NB_SMOKE") == "1" else "full"
CFG = {
    "smoke": dict(gin_file="test_tiny.gin", num_steps=20, batch_size=8, eval_every=10,
                  log_every=5, analysis_batches=None),
    "full": dict(gin_file="default.gin", num_steps=300, batch_size=16, eval_every=100,
                 log_every=25, analysis_batches=None),
}[SIZE]
print(f"SIZE={SIZE}: {CFG}")
print("devices:", jax.devices())

# %% [markdown]
# ## Configure from gin and train
#
# The experiment file includes a model file (`gin_configs/models/`) and a data file
# (`gin_configs/data/`); bindings below override it, as `--gin_param` does for
# `scripts/train.py`. `MESH_SHAPE = {'data': -1}` puts every device present on the
# data axis of the mesh (the global batch is rounded up to a multiple of the
# device count).

# %%
num_devices = jax.device_count()
batch_size = -(-CFG["batch_size"] // num_devices) * num_devices
bindings = [
    f"train.num_steps = {CFG['num_steps']}",
    f"train.eval_every = {CFG['eval_every']}",
    f"train.log_every = {CFG['log_every']}",
    "train.num_microbatches = 1",
    f"DataConfig.batch_size = {batch_size}",
    f"DataConfig.eval_batch_size = {batch_size}",
    "MESH_SHAPE = {'data': -1}",
]
gin.clear_config()
gin_utils.parse([str(ROOT / "gin_configs" / "experiments" / CFG["gin_file"])], bindings)
WORKDIR = Path(os.environ.get("NB_WORKDIR") or tempfile.mkdtemp(prefix="sparse_moe_nb02_"))
print("workdir:", WORKDIR)

summary = train(WORKDIR, quiet=True)
print(json.dumps({k: summary[k] for k in ("step", "train_loss", "valid_loss")}, indent=1))

# %% [markdown]
# ## Loss curves
#
# Cross-entropy in nats per token (byte tokens here), train every step and
# validation per domain; the dashed line is the corpus's byte unigram entropy, the
# loss of a model that ignores context.

# %%
train_records = read_jsonl(WORKDIR / "metrics.jsonl", "train")
valid_records = read_jsonl(WORKDIR / "metrics.jsonl", "valid")
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([r["step"] for r in train_records], [r["ce"] for r in train_records], lw=1,
        label="train")
for domain in summary["domains"]:
    ax.plot([r["step"] for r in valid_records], [r[f"{domain}/loss"] for r in valid_records],
            "o-", label=f"valid {domain}")
if summary["unigram_entropy"]:
    ax.axhline(summary["unigram_entropy"]["nats_per_byte"], color="k", ls="--", lw=1,
               label="unigram entropy")
ax.set_xlabel("step")
ax.set_ylabel("nats / token")
ax.legend()
plt.show()
assert np.mean([r["ce"] for r in train_records[-3:]]) < train_records[0]["ce"]

# %% [markdown]
# ## Expert load during training
#
# The trainer logs each MoE layer's share of assignments per expert to TensorBoard
# (`moe/<layer>/load/expert_<i>`); read the event files back and plot them.
# 1/E is a perfectly balanced expert.

# %%
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

events = event_accumulator.EventAccumulator(str(WORKDIR / "tensorboard"),
                                            size_guidance={event_accumulator.SCALARS: 0})
events.Reload()
tags = events.Tags()["scalars"]
layers = sorted({t.split("/")[1] for t in tags if t.startswith("moe/") and "/load/" in t})
fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 3), squeeze=False)
for ax, layer in zip(axes[0], layers):
    expert_tags = sorted((t for t in tags if t.startswith(f"moe/{layer}/load/")),
                         key=lambda t: int(t.rsplit("_", 1)[1]))
    for tag in expert_tags:
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points], label=tag.rsplit("/", 1)[1])
    ax.axhline(1 / len(expert_tags), color="k", ls="--", lw=1)
    ax.set_title(f"{layer}: expert load")
    ax.set_xlabel("step")
axes[0][0].legend(fontsize=7, ncol=2)
plt.show()
print({layer: [round(x, 3) for x in info["load"]] for layer, info in summary["moe"].items()})

# %% [markdown]
# ## TensorBoard, inline
#
# In Jupyter or Colab this opens TensorBoard on the run (scalars, the per-layer load
# histograms). Skipped outside IPython and in smoke runs.

# %%
try:
    from IPython import get_ipython
    ipython = get_ipython()
except ImportError:
    ipython = None
if ipython is not None and SIZE == "full":
    ipython.run_line_magic("load_ext", "tensorboard")
    ipython.run_line_magic("tensorboard", f"--logdir {WORKDIR / 'tensorboard'}")
else:
    print(f"TensorBoard: tensorboard --logdir {WORKDIR / 'tensorboard'}")

# %% [markdown]
# ## Domain × expert heat map
#
# Restore the last checkpoint, route the validation batches once per domain, and
# count where each domain's tokens go (`experiments.reporting.routing_report`, the code
# behind `scripts/analyze_routing.py`). Rows are domains, columns experts, cells
# the share of that domain's assignments; I(domain; expert) measures how much
# routing depends on the domain.

# %%
report = analyze_workdir(WORKDIR, max_batches=CFG["analysis_batches"])
layer_names = sorted(report["layers"])
fig, axes = plt.subplots(1, len(layer_names), figsize=(5 * len(layer_names), 2.5),
                         squeeze=False)
for ax, layer in zip(axes[0], layer_names):
    info = report["layers"][layer]
    counts = np.asarray(info["counts"], dtype=float)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    image = ax.imshow(fractions, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(info["domains"])), info["domains"])
    ax.set_xlabel("expert")
    ax.set_title(f"{layer}: I = {info['mutual_information_bits']:.3f} bits")
    fig.colorbar(image, ax=ax)
plt.show()
