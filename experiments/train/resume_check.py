"""Refusing to resume a workdir whose checkpoints were written by another model.

The checkpointer compares a checkpoint's stored structure, shapes and dtypes
with the configured model before reading any array
(`experiments.runtime.checkpoints.CheckpointMismatchError`). This module turns
that into one line naming the model settings that differ, read from the gin
bindings the workdir's earlier run recorded (`operative_config.gin`, else
`config.gin`) and the bindings of this run, e.g.

  workdir W was trained with another model configuration (TransformerLM.d_model:
  checkpoint 32, config 64); use a new --workdir, or convert the checkpoint
  (scripts/upcycle.py for dense -> MoE); nothing was changed in W
"""

from __future__ import annotations

from typing import Any

import gin
from gin import config_parser

from experiments.runtime import gin_utils, paths
from experiments.runtime.checkpoints import CheckpointMismatchError

# Bindings of configurables defined in these modules shape the parameters and the
# optimizer state; other settings (steps, data, checkpoints) may change on resume.
_MODEL_MODULES = ("layers.", "moe.", "experiments.train.optim")
_SHOWN = 4


class ConfigMismatchError(ValueError):
    """The workdir's checkpoints do not fit the configured model (exit status 2)."""


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_format(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_format(k)}: {_format(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "selector"):  # @configurable reference (maybe unknown here)
        return "@" + value.selector + ("()" if getattr(value, "evaluate", False) else "")
    if hasattr(value, "name") and type(value).__name__.endswith("Macro"):
        return "%" + value.name
    return repr(value)


def parse_bindings(text: str) -> dict[str, str]:
    """`{'scope/Selector.param': value as text}` of a gin config text (includes and
    imports are skipped; unknown configurables are kept by name)."""
    out = {}
    delegate = gin.config.ParserDelegate(skip_unknown=True)
    for statement in config_parser.ConfigParser(text, delegate):
        if isinstance(statement, config_parser.BindingStatement):
            scope = f"{statement.scope}/" if statement.scope else ""
            out[f"{scope}{statement.selector}.{statement.arg_name}"] = _format(statement.value)
    return out


def _shapes_model(key: str) -> bool:
    selector = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    try:
        configurable = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
        return False
    module = getattr(getattr(configurable, "wrapped", None), "__module__", "") or ""
    return module.startswith(_MODEL_MODULES)


def recorded_bindings(workdir: paths.Path) -> dict[str, str] | None:
    """The bindings the workdir's earlier run recorded, or None without a record."""
    for name in (gin_utils.OPERATIVE_CONFIG_FILE, gin_utils.CONFIG_FILE):
        path = workdir / name
        if path.is_file():
            try:
                return parse_bindings(path.read_text(encoding="utf-8"))
            except Exception:  # pylint: disable=broad-except  # an unparsable record
                continue
    return None


def differing_settings(workdir: paths.Path) -> list[str]:
    """`'Selector.param: checkpoint X, config Y'` for each model setting bound to a
    different value by the workdir's record and by this run."""
    old = recorded_bindings(workdir)
    if old is None:
        return []
    new = parse_bindings(gin.operative_config_str())
    new.update({k: v for k, v in parse_bindings(gin.config_str()).items() if k not in new})
    return [f"{key}: checkpoint {old[key]}, config {new[key]}"
            for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and _shapes_model(key)]


def mismatch_error(error: CheckpointMismatchError, workdir: paths.Path) -> ConfigMismatchError:
    """The one-line refusal for `error`, naming the differing settings (else the
    arrays whose shapes differ) and what to do."""
    differences = differing_settings(workdir) or error.differences
    shown = "; ".join(differences[:_SHOWN])
    if len(differences) > _SHOWN:
        shown += f"; and {len(differences) - _SHOWN} more"
    return ConfigMismatchError(
        f"workdir {workdir} holds checkpoints (step {error.step}) of another model "
        f"configuration ({shown}); use a new --workdir, or convert the checkpoint "
        f"(scripts/upcycle.py for dense -> MoE); nothing in the workdir was changed")
