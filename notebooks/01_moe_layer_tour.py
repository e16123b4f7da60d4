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
# # 01 · A tour of the MoE layer
#
# Build a `MoeLayer`, route a batch, and look at what routing does:
#
# 1. expert load before and after dropping;
# 2. dropped tokens at several capacity factors;
# 3. top-k combine weights under each normalisation (softmax/sigmoid, raw/renormalised),
#    set on the router module the layer is given;
# 4. the dispatch backends: same outputs, what each drops, different speed;
# 5. the same layer on every device present, through the mesh code.
#
# Runs on CPU, GPU or TPU. `NB_SMOKE=1` shrinks every size (the CI runs it that way).

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
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from layers import MoeLayer  # noqa: E402
from layers.routers import TopKRouter  # noqa: E402
from moe.dispatch import expert_parallel as ep_lib  # noqa: E402
from moe.dispatch import runnable_dispatches  # noqa: E402
from moe.dispatch.registry import dispatch_traits  # noqa: E402

# One variable sets every size: "smoke" (CI, < 1 min on CPU) or "full".
SIZE = "smoke" if os.environ.get("NB_SMOKE") == "1" else "full"
CFG = {
    "smoke": dict(batch=4, seq=32, d_model=32, d_ff=64, num_experts=8, k=2, timing_rounds=3),
    "full": dict(batch=16, seq=256, d_model=256, d_ff=512, num_experts=8, k=2, timing_rounds=10),
}[SIZE]
print(f"SIZE={SIZE}: {CFG}")
print("devices:", jax.devices())

# %% [markdown]
# ## 1. Build a layer and route a batch
#
# The inputs share a common direction, so the router has something to prefer and
# the load is uneven. The layer returns `(y, aux)`; `aux` is a `moe.layer_aux.MoeAux`
# whose fields hold the routing statistics (all float32): `aux.lbl`, `aux.counts`, ...
# The router is a module of its own (`layer.router`, a `TopKRouter` by default).

# %%
B, S, D, F = CFG["batch"], CFG["seq"], CFG["d_model"], CFG["d_ff"]
E, K = CFG["num_experts"], CFG["k"]
key_x, key_skew = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (B, S, D)) + 2.0 * jax.random.normal(key_skew, (1, 1, D))


def make_layer(**kwargs) -> MoeLayer:
    """Same seed, so every variant has the same router and expert weights."""
    return MoeLayer(D, F, num_experts=E, k=K, rngs=nnx.Rngs(0), **kwargs)


layer = make_layer(capacity_factor=1.0)
y, aux = layer(x)
print("y:", y.shape, "capacity per expert:", layer.capacity(B * S, deterministic=True))
print("router:", type(layer.router).__name__)
for name in ("lbl", "z_loss", "dropped_fraction", "max_violation", "router_entropy",
             "active_experts"):
    print(f"  {name:<17} {float(getattr(aux, name)):.4f}")

# %% [markdown]
# ## 2. Expert load, before and after dropping
#
# `counts` are assignments before dropping (what the load-balancing loss sees);
# `kept_counts` after the capacity cut (capacity factor 1.0 here).

# %%
experts = np.arange(E)
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(experts - 0.2, np.asarray(aux.counts), width=0.4, label="assigned")
ax.bar(experts + 0.2, np.asarray(aux.kept_counts), width=0.4, label="kept")
ax.axhline(layer.capacity(B * S, deterministic=True), color="k", ls="--", lw=1, label="capacity")
ax.set_xlabel("expert")
ax.set_ylabel("token assignments")
ax.set_title(f"E={E}, k={K}, capacity factor 1.0")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Dropped tokens at several capacity factors
#
# Capacity C = ceil(k·T·cf / E). `None` is dropless (sorted grouped matmul).

# %%
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, None]
dropped = {}
for cf in factors:
    _, aux_cf = make_layer(capacity_factor=cf)(x)
    dropped[cf] = float(aux_cf.dropped_fraction)
    print(f"  {'dropless' if cf is None else f'cf={cf}':<9} dropped {dropped[cf]:.3f}")

fig, ax = plt.subplots(figsize=(6, 3))
labels = ["dropless" if cf is None else str(cf) for cf in factors]
ax.bar(labels, [dropped[cf] for cf in factors])
ax.set_xlabel("capacity factor")
ax.set_ylabel("dropped fraction")
plt.show()
assert dropped[None] == 0.0 and dropped[0.5] >= dropped[2.0]

# %% [markdown]
# ## 4. Top-k combine weights under each normalisation
#
# The same router weights, gated four ways: softmax or sigmoid scores, raw
# (Switch/OLMoE, "A") or renormalised over the k chosen ("B"/"C"). These are options of
# the router, not of the layer: pass `router=functools.partial(TopKRouter, score=...,
# normalize=...)` to `MoeLayer` (in gin: `MoeLayer.router = @TopKRouter` and
# `TopKRouter.score = 'sigmoid'`). Calling the router on the flattened tokens gives the
# `Routing` the layer hands to its dispatch: chosen experts and combine weights.

# %%
tokens = x.reshape(-1, D)
fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
for ax, (score, normalize) in zip(axes, [("softmax", False), ("softmax", True),
                                         ("sigmoid", False), ("sigmoid", True)]):
    gated = make_layer(router=functools.partial(TopKRouter, score=score, normalize=normalize))
    decision = gated.router(tokens, mask=jnp.ones(B * S), capacity=None, deterministic=True,
                            rng=None, state={})
    weights = np.asarray(decision.weights)
    for rank in range(K):
        ax.hist(weights[:, rank], bins=30, alpha=0.6, label=f"choice {rank + 1}")
    ax.set_title(f"{score}, normalize={normalize}\nmean sum {weights.sum(1).mean():.2f}")
    ax.set_xlabel("combine weight")
axes[0].legend()
plt.show()

# %% [markdown]
# ## 5. Dispatch backends
#
# Every registered dispatch computes the same dropless layer; they differ in how
# tokens reach their experts (one-hot einsum, sort + grouped matmul, `ragged_dot`,
# Pallas kernels, the expert-parallel all-to-all). Each row shows the measured
# dropped fraction and what the dispatch's traits (`dispatch_traits`) promise: the
# exactly dropless ones drop nothing and agree to float32 rounding. The expert-parallel
# dispatch sizes its buffers to the worst case by default; its opt-in bounded buffer
# (`Sharding.ep_buffer_factor`, shown as an extra row) is *not* dropless: what
# overflows is dropped and counted in `dropped_fraction`. Times are medians of paired
# ratios against `einsum`, interleaved, in this process (`ragged_dot` is slow on CPU
# by design; it is native on GPU/TPU).

# %%
backends = runnable_dispatches()  # installed, and no Pallas interpret mode on CPU
forward = {}
for name in backends:
    graphdef, state = nnx.split(make_layer(dispatch=name, capacity_factor=None))
    forward[name] = (jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x)), state)

outputs = {name: fn(state, x) for name, (fn, state) in forward.items()}
exact = {name: dispatch_traits(name).exact_dropless for name in backends}
for name in backends:  # a dispatch that can bound its buffers, run with the opt-in
    if dispatch_traits(name).bounded_option == "Sharding.ep_buffer_factor":
        with ep_lib.use_options(ep_lib.ExpertParallelOptions(buffer_factor=2.0)):
            label = f"{name} (ep_buffer_factor=2.0)"
            outputs[label] = make_layer(dispatch=name, capacity_factor=None)(x)
            exact[label] = False
error = {name: float(jnp.max(jnp.abs(y - outputs["einsum"][0])))
         for name, (y, _) in outputs.items()}
for name, (_, aux_d) in outputs.items():
    kind = "exact dropless" if exact[name] else "bounded buffers: may drop"
    print(f"  {name:<38} max |y - y_einsum| = {error[name]:.2e}   "
          f"dropped {float(aux_d.dropped_fraction):.3f}   {kind}")


def run_once(name: str) -> float:
    fn, state = forward[name]
    start = time.perf_counter()
    jax.block_until_ready(fn(state, x))
    return time.perf_counter() - start


ratios = {name: [] for name in backends}
for _ in range(CFG["timing_rounds"]):
    for name in backends:
        base = run_once("einsum")
        ratios[name].append(run_once(name) / base)
for name in backends:
    print(f"  {name:<16} time / einsum: {np.median(ratios[name]):.2f}")
assert all(error[name] < 1e-3 for name, (_, a) in outputs.items() if a.dropped_fraction == 0)
assert all(float(outputs[name][1].dropped_fraction) == 0.0 for name in exact if exact[name])

# %% [markdown]
# ## 6. Every device, through the mesh code
#
# `experiments.runtime.mesh.Sharding` builds the mesh over the axes
# `(data, fsdp, expert, tensor)` and the logical-axis rules. Here every device goes
# on `data`: parameters are placed by their logical axes, the batch is split over
# devices, and the layer runs under the mesh context. The result matches the
# single-device one.

# %%
from experiments.runtime.mesh import Sharding  # noqa: E402
from layers.params import logical_axes_of  # noqa: E402

num_devices = jax.device_count()
sharder = Sharding(mesh_shape={"data": -1})
print("mesh:", sharder.mesh_shape)
rows = (B // num_devices or 1) * num_devices  # a multiple of the device count
x_rows = jnp.tile(x, (rows // B + 1, 1, 1))[:rows]

mesh_layer = make_layer(capacity_factor=None)
graphdef, params, rest = nnx.split(mesh_layer, nnx.Param, ...)
params = sharder.place_params(params.to_pure_dict(), logical_axes_of(mesh_layer))
x_sharded = jax.device_put(x_rows, sharder.batch_sharding(x_rows.ndim))


@jax.jit
def apply(params, x):
    state = nnx.State(params)
    return nnx.merge(graphdef, state, rest)(x)[0]


with sharder.context():
    y_mesh = apply(params, x_sharded)
print("output sharding:", y_mesh.sharding)
print("rows per device:", [s.data.shape[0] for s in y_mesh.addressable_shards])
y_single = mesh_layer(x_rows)[0]
print("max |y_mesh - y_single| =", float(jnp.max(jnp.abs(y_mesh - y_single))))
assert float(jnp.max(jnp.abs(y_mesh - y_single))) < 1e-3
