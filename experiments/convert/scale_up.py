"""Scale-up of a dense checkpoint of our trainer into a larger dense one (AquilaMoE's
first stage; `scripts/upcycle.py` then performs the scale-out), docs/surgery.md.

`scale_up(workdir, out_workdir, config)` reads the dense checkpoint (scanned or not),
grows it with `moe.scale_up` (width: d_ff and heads; d_model; depth), and writes a
new workdir in a temporary directory beside `out_workdir`, renamed into place:
`checkpoints/<step>` (the source step, data position and RNG key; fresh AdamW
moments, the learning-rate schedule's step kept), `config.gin` (the source config
with the new `TransformerLM.d_model / d_ff / num_heads / num_layers`, `head_dim`
pinned to the source's, and `norm_eps` x d/d' for the zero d_model scheme),
`scale_up.json`, the tokenizer. `verify=True` compares the logits of source and
grown model on validation batches; exact (fp32 tolerance) for the
function-preserving schemes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax
from flax import nnx

from experiments.convert import dense_to_moe
from experiments.convert.expert_surgery import _check_out, _read_full, write_workdir
from experiments.convert.verify import VerifyReport, verify_models
from experiments.data.config import DataConfig
from experiments.inference.restore import model_cls, parse_run_config
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.config import model_vocab_size
from experiments.train.optim import make_optimizer
from layers import scan as scan_lib
from layers.attention import Attention
from layers.mlp import DenseMLP
from moe import scale_up as su

SCALE_UP_FILE = "scale_up.json"


@dataclasses.dataclass(frozen=True)
class ScaleUpConfig:
    """Target sizes (None = the source's) and schemes (`moe.scale_up`); step: the
    source checkpoint step (None = latest)."""

    d_model: int | None = None
    d_ff: int | None = None
    num_heads: int | None = None
    num_layers: int | None = None
    width: str = "fpi"
    d_model_scheme: str = "zero"
    depth: str = "identity"
    step: int | None = None

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclasses.dataclass
class ScaleUpResult:
    out_workdir: Path
    step: int
    source: su.Shape
    target: su.Shape
    violations: list[str]
    param_counts: tuple[int, int]
    verify: VerifyReport | None = None


@dataclasses.dataclass
class _Source:
    shape: su.Shape
    head_dim: int
    num_kv_heads: int
    tied: bool
    qk_norm: bool
    qk_projection: bool
    norm_eps: float
    vocab_size: int
    graphdef: nnx.GraphDef
    layout: dict[str, Any]


def _abstract(vocab_size: int) -> Any:
    return nnx.eval_shape(lambda: model_cls()(vocab_size=vocab_size, rngs=nnx.Rngs(0)))


def read_source(workdir: Path) -> _Source:
    """The source model's sizes and structure (gin left with its config); refuses MoE
    checkpoints and blocks scale-up has no rule for."""
    parse_run_config(workdir)
    vocab_size = model_vocab_size()
    model = _abstract(vocab_size)
    if getattr(model, "moe_layer_names", ()):
        raise ValueError(f"{workdir}: the checkpoint has MoE layers "
                         f"{list(model.moe_layer_names)}; scale-up grows a dense model (scale "
                         f"up first, then upcycle with scripts/upcycle.py)")
    blocks = [model.block(n) for n in model.layer_names]
    if not all(isinstance(b.ffn, DenseMLP) and type(b.attention) is Attention for b in blocks):
        raise ValueError(f"{workdir}: scale-up needs dense FFNs (DenseMLP) and the standard "
                         f"attention (layers.attention.Attention) in every layer")
    attn = blocks[0].attention
    qk = getattr(attn, "query_norm", None)
    graphdef, layout = nnx.split(model, nnx.Param)[:2]
    return _Source(
        shape=su.Shape(model.d_model, blocks[0].ffn.wi.shape[-1], attn.num_heads,
                       model.num_layers),
        head_dim=attn.head_dim, num_kv_heads=attn.num_kv_heads, tied=model.tie_embeddings,
        qk_norm=qk is not None,
        qk_projection=qk is not None and qk.scale.shape[-1] != attn.head_dim,
        norm_eps=float(model.final_norm.eps), vocab_size=vocab_size,
        graphdef=graphdef, layout=layout.to_pure_dict())


def target_bindings(source: _Source, growth: su.Growth) -> list[str]:
    """The gin bindings that describe the grown model."""
    s, t = source.shape, growth.target
    if t.num_heads != s.num_heads:
        if source.num_kv_heads != s.num_heads:
            raise ValueError(f"num_heads: growing heads needs multi-head attention; the source "
                             f"has num_kv_heads={source.num_kv_heads} < num_heads={s.num_heads}")
        if source.qk_projection:
            raise ValueError("num_heads: qk_norm='projection' normalises over all heads; "
                             "head growth has no rule for it")
    bindings = [f"TransformerLM.d_model = {t.d_model}", f"TransformerLM.d_ff = {t.d_ff}",
                f"TransformerLM.num_heads = {t.num_heads}",
                f"TransformerLM.num_layers = {t.num_layers}",
                f"TransformerLM.head_dim = {source.head_dim}"]
    if source.num_kv_heads == s.num_heads and _bound("TransformerLM.num_kv_heads"):
        bindings.append(f"TransformerLM.num_kv_heads = {t.num_heads}")
    if t.d_model != s.d_model and growth.norm_eps_factor != 1.0:
        bindings.append(f"TransformerLM.norm_eps = {source.norm_eps * growth.norm_eps_factor!r}")
    return bindings


def _bound(binding: str) -> Any:
    """The bound value of `binding`, or None when unbound."""
    try:
        return gin.query_parameter(binding)
    except ValueError:
        return None


def _count(tree: Any) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def scale_up(workdir: str | Path, out_workdir: str | Path, config: ScaleUpConfig, *,
             verify: bool = False, verify_batches: int = 2) -> ScaleUpResult:
    """The whole scale-up (module docstring); leaves gin with the target config."""
    workdir, out = Path(workdir).absolute(), Path(out_workdir).absolute()
    _check_out(workdir, out)
    source = read_source(workdir)
    s = source.shape
    target = su.Shape(config.d_model or s.d_model, config.d_ff or s.d_ff,
                      config.num_heads or s.num_heads, config.num_layers or s.num_layers)
    if target == s:
        raise ValueError("nothing to grow: give a larger --d_model, --d_ff, --num_heads or "
                         "--num_layers than the source's "
                         f"({s.d_model}, {s.d_ff}, {s.num_heads}, {s.num_layers})")
    growth = su.Growth(s, target, width=config.width, d_model_scheme=config.d_model_scheme,
                       depth=config.depth)
    bindings = target_bindings(source, growth)
    tx = make_optimizer(optax.constant_schedule(0.0))
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        step = checkpointer.pick_step(config.step, option="step")
    finally:
        checkpointer.close()
    full = _read_full(workdir, step, jax.eval_shape(lambda: source.layout), tx)
    source_params = jax.device_get(full.params)
    grown = su.scale_up(scan_lib.unscan_tree(source_params), growth, tied=source.tied,
                        layer_name=scan_lib.layer_name)

    parse_run_config(workdir)
    gin_utils.parse([], bindings)
    big = _abstract(source.vocab_size)
    graphdef, like = nnx.split(big, nnx.Param)[:2]
    like = like.to_pure_dict()
    flat_like = dense_to_moe.flatten(scan_lib.unscan_tree(like))
    flat = dense_to_moe.flatten(grown)
    bad = [dense_to_moe.path_str(p) for p in set(flat) | set(flat_like)
           if p not in flat or p not in flat_like
           or tuple(np.shape(flat[p])) != tuple(flat_like[p].shape)]
    if bad:
        raise ValueError(f"the grown parameters do not fit the target config at {sorted(bad)[:4]}")
    grown = dense_to_moe.unflatten({p: np.asarray(v).astype(flat_like[p].dtype)
                                    for p, v in flat.items()})
    params = scan_lib.match_layer_layout(grown, like)
    opt_state = dense_to_moe.fresh_opt_state(jax.device_get(full.opt_state), tx.init(params))
    result = ScaleUpResult(out_workdir=out, step=step, source=s, target=target,
                           violations=growth.violations(source.tied, source.qk_norm),
                           param_counts=(_count(source_params), _count(params)))
    if verify:
        result.verify = verify_models(source.graphdef, source_params, graphdef, params,
                                      DataConfig().eval_batches()[:verify_batches],
                                      violated=result.violations)
    _write(workdir, out, full, params, opt_state, config, result)
    return result


def _write(workdir: Path, out: Path, full: Any, params: Any, opt_state: Any,
           config: ScaleUpConfig, result: ScaleUpResult) -> None:
    record = {"source_workdir": str(workdir), "step": result.step,
              "config": dataclasses.asdict(config),
              "source": dataclasses.asdict(result.source),
              "target": dataclasses.asdict(result.target),
              "function_preserving": not result.violations, "violations": result.violations,
              "param_counts": list(result.param_counts)}
    if result.verify is not None:
        record["verify"] = {"max_abs_logit_diff": result.verify.max_abs_logit_diff,
                            "source_loss": result.verify.dense_loss,
                            "grown_loss": result.verify.moe_loss, "ok": result.verify.ok}
    write_workdir(workdir, out, result.step, full, params, opt_state,
                  lambda tmp: (tmp / SCALE_UP_FILE).write_text(json.dumps(record, indent=2),
                                                          encoding="utf-8"))
