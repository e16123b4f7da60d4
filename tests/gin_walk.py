"""Test-only machinery for "every gin binding takes effect or is refused".

`record_calls()` instruments every registered configurable so that each call
records the arguments the wrapped function actually received (after gin
supplied its bindings and the caller's explicit arguments won). `walk()` binds,
one at a time, a distinctive value to every bindable parameter of every
configurable a build called, rebuilds, and classifies the outcome:

  * "reached": every recorded call received the bound value (or the build
    refused it with an error naming the parameter);
  * "refused": gin rejected the binding itself (e.g. a denylisted parameter);
  * "ignored": some call received another value: the caller passed the
    argument explicitly, so the binding was silently overridden;
  * "not called": the configurable was not called after binding the value, and
    no error named the parameter.

This reads gin's private registry (`gin.config._REGISTRY`) and swaps the
function cell of gin's wrapper closure; `record_calls` raises if that layout
changes, so a gin upgrade fails loudly instead of passing vacuously.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
from gin import config as gin_config


@dataclasses.dataclass
class Call:
    """One call of a configurable: its gin scope and the arguments received by name."""

    scope: str
    arguments: dict[str, Any]


class StopBuild(Exception):
    """Raised by the recorder once the configurable under test has been called
    as often as in the reference build: the rest of the build is not needed."""


@dataclasses.dataclass
class Recording:
    calls: dict[str, list[Call]] = dataclasses.field(default_factory=dict)
    stop_after: tuple[str, int] | None = None  # (selector, number of calls)

    def add(self, selector: str, call: Call) -> None:
        self.calls.setdefault(selector, []).append(call)
        if self.stop_after is not None and self.stop_after[0] == selector \
                and len(self.calls[selector]) >= self.stop_after[1]:
            raise StopBuild(selector)


def _construction_fn(cls: type) -> Callable[..., Any]:
    return gin_config._find_class_construction_fn(cls)  # pylint: disable=protected-access


def _gin_wrapper(entry: gin_config.Configurable) -> tuple[Callable[..., Any], inspect.Signature]:
    """The function gin put in place of the configurable, and the signature its
    wrapped function is called with.

    `@gin.configurable` replaces a class's constructor in place;
    `gin.register`/`external_configurable` wrap the call of a dynamically made
    metaclass, whose wrapped function takes the class first where `__init__`
    takes `self`.
    """
    if not inspect.isclass(entry.wrapper):
        return entry.wrapper, inspect.signature(entry.wrapper)
    construct = _construction_fn(entry.wrapper)
    if hasattr(construct, "__wrapped__"):
        return construct, inspect.signature(construct)
    return type(entry.wrapper).__call__, inspect.signature(_construction_fn(entry.wrapped))


def _function_cell(wrapper: Callable[..., Any]):
    """The closure cell of gin's wrapper that holds the wrapped function."""
    inner = getattr(wrapper, "__wrapped__", None)
    for cell in getattr(wrapper, "__closure__", None) or ():
        try:
            if cell.cell_contents is inner:
                return cell
        except ValueError:  # an empty cell
            continue
    raise RuntimeError(f"gin's wrapper {wrapper!r} has no cell holding the wrapped function; "
                       f"gin's internals changed: update tests/gin_walk.py")


def registered() -> dict[str, gin_config.Configurable]:
    """Every configurable that is registered now, by selector (not gin's own built-ins)."""
    return {selector: entry for selector, entry in gin_config._REGISTRY.items()  # pylint: disable=protected-access
            if not selector.startswith("gin.")}


@contextlib.contextmanager
def record_calls(recording: Recording) -> Iterator[Recording]:
    """Every registered configurable records the arguments its body receives."""
    swapped = []
    try:
        for selector, entry in registered().items():
            wrapper, signature = _gin_wrapper(entry)
            cell = _function_cell(wrapper)
            original = cell.cell_contents

            def recorder(*args, __original=original, __signature=signature,
                         __selector=selector, **kwargs):
                bound_arguments = __signature.bind_partial(*args, **kwargs)
                bound_arguments.apply_defaults()
                bound = bound_arguments.arguments
                arguments = {}
                for name, value in bound.items():
                    kind = __signature.parameters[name].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(value)
                    elif kind is not inspect.Parameter.VAR_POSITIONAL:
                        arguments[name] = value
                recording.add(__selector, Call(gin.current_scope_str(), arguments))
                return __original(*args, **kwargs)

            cell.cell_contents = recorder
            swapped.append((cell, original))
        yield recording
    finally:
        for cell, original in swapped:
            cell.cell_contents = original


def bindable_parameters(entry: gin_config.Configurable) -> list[str]:
    """The parameter names a gin binding may set: the signature minus `self`,
    `*args`/`**kwargs` and gin's denylist (or only the allowlist)."""
    fn = _construction_fn(entry.wrapped) if inspect.isclass(entry.wrapped) else entry.wrapped
    names = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if i == 0 and inspect.isclass(entry.wrapped) and p.name in ("self", "cls"):
            continue
        if entry.denylist and p.name in entry.denylist:
            continue
        if entry.allowlist and p.name not in entry.allowlist:
            continue
        names.append(p.name)
    return names


class Sentinel:
    """A distinctive value for parameters whose values are not literals (objects,
    classes, callables): it reaches a callee unchanged (gin deep-copies bound
    values; this one copies to itself)."""

    def __init__(self, name: str):
        self.name = name

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"Sentinel({self.name})"


def _annotation_kinds(entry: gin_config.Configurable, name: str) -> str:
    fn = _construction_fn(entry.wrapped) if inspect.isclass(entry.wrapped) else entry.wrapped
    parameter = inspect.signature(fn).parameters[name]
    annotation = parameter.annotation
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")


def distinctive_value(key: str, current: Any, annotation: str,
                      alternatives: Mapping[str, Any]) -> Any:
    """A value different from `current` that a user might plausibly bind.

    `alternatives` (per `configurable.parameter`) wins; otherwise the type of
    the current value (or, for None, of the annotation) decides: int -> +1,
    float -> x1.37, bool -> not, str -> a marked string (the callee's
    validation names it; that still proves the value reached it). Anything else
    gets a `Sentinel`.
    """
    if key in alternatives:
        return alternatives[key]
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return current * 1.37 if current else 0.0137
    if isinstance(current, str):
        return f"gin_walk_{key.rpartition('.')[2]}"
    if current is None:
        for pattern, value in ((r"\bbool\b", True), (r"\bint\b", 3), (r"\bfloat\b", 1.37),
                               (r"\bstr\b", f"gin_walk_{key.rpartition('.')[2]}")):
            if re.search(pattern, annotation):
                return value
    return Sentinel(key)


def _same(received: Any, bound: Any) -> bool:
    if received is bound:
        return True
    if isinstance(bound, Sentinel) or type(received) is not type(bound):
        return False
    try:
        return bool(received == bound)
    except Exception:  # pylint: disable=broad-except
        return False


@dataclasses.dataclass
class Outcome:
    key: str  # "configurable.parameter"
    verdict: str  # "reached", "refused", "ignored", "not called"
    detail: str = ""


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _names_parameter(error: BaseException, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", str(error)) is not None


def check_binding(selector: str, name: str, value: Any, scopes: Sequence[str],
                  reference_calls: int, setup: Callable[[], None],
                  build: Callable[[], None]) -> Outcome:
    """Binds `selector.name = value` (in each scope the configurable was called
    in) on top of `setup()`'s configuration, rebuilds, and classifies."""
    key = f"{selector}.{name}"
    gin.clear_config()
    setup()
    try:
        for scope in scopes:
            gin.bind_parameter(f"{scope}/{key}" if scope else key, value)
    except ValueError as e:
        return Outcome(key, "refused", str(e))
    recording = Recording(stop_after=(selector, reference_calls))
    error: BaseException | None = None
    with record_calls(recording):
        try:
            build()
        except StopBuild:
            pass
        except Exception as e:  # pylint: disable=broad-except
            error = e
    calls = recording.calls.get(selector, [])
    wrong = [c.arguments.get(name, "<not passed>") for c in calls
             if not _same(c.arguments.get(name, "<not passed>"), value)]
    if wrong:
        return Outcome(key, "ignored", f"bound {_short(value)}, the callee received "
                                       f"{_short(wrong[0])} in {len(wrong)} of {len(calls)} calls")
    if calls:
        return Outcome(key, "reached")
    if error is not None and _names_parameter(error, name):
        return Outcome(key, "reached", f"refused by validation: {error}")
    return Outcome(key, "not called", f"build error: {_short(error)}" if error else "")


def report(outcomes: Sequence[Outcome], verdicts: Sequence[str] = ("ignored", "not called")) -> str:
    """The outcomes with one of `verdicts`, grouped by configurable."""
    lines, last = [], None
    for o in sorted((o for o in outcomes if o.verdict in verdicts), key=lambda o: o.key):
        configurable, _, name = o.key.rpartition(".")
        if configurable != last:
            lines.append(f"  {configurable}:")
            last = configurable
        lines.append(f"    .{name}: {o.verdict}: {o.detail}")
    return "\n".join(lines)


def walk(setup: Callable[[], None], build: Callable[[], None],
         alternatives: Mapping[str, Any] | None = None) -> tuple[list[str], list[Outcome]]:
    """Builds once to find the configurables called, then checks each bindable
    parameter of each. Returns (selectors called, outcomes).

    `alternatives`: `{full selector.parameter: value}` to bind instead of the
    value `distinctive_value` derives from the type.
    """
    gin.clear_config()
    setup()
    reference = Recording()
    with record_calls(reference):
        build()
    entries = registered()
    outcomes = []
    for selector, calls in sorted(reference.calls.items()):
        entry = entries[selector]
        scopes = sorted({c.scope for c in calls})
        for name in bindable_parameters(entry):
            key = f"{selector}.{name}"
            current = next((c.arguments[name] for c in calls if name in c.arguments), None)
            value = distinctive_value(key, current, _annotation_kinds(entry, name),
                                      alternatives or {})
            outcomes.append(check_binding(selector, name, value, scopes, len(calls), setup, build))
    return sorted(reference.calls), outcomes
