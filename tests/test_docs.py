"""Docs that run: the blocks of README.md and docs/*.md marked runnable
(tests/doc_blocks.py describes the marker) run or parse with tiny overrides and
show the documented outcome; the README lists every script; docs/training.md
lists the TensorBoard tags a run writes."""

from __future__ import annotations

import fcntl
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import gin
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea

# Imported for their gin registrations: every configurable a train run may bind.
from experiments.data.config import DataConfig
from experiments.runtime import gin_utils
from experiments.train import trainer  # noqa: F401  pylint: disable=unused-import
from tests.doc_blocks import Block, localise, runnable_blocks
from tests.helpers import REPO, script_env, shared_dir

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = runnable_blocks(DOCS)
SH = [b for b in BLOCKS if b.kind == "sh"]
GIN = [b for b in BLOCKS if b.kind == "gin"]


def test_the_useful_blocks_are_marked_runnable():
    # Removing a marker (or the convention breaking) would silently drop a check.
    marked = {(b.path.name, b.kind) for b in BLOCKS}
    assert {("README.md", "sh"), ("upcycling.md", "sh"), ("data.md", "gin"),
            ("configs.md", "gin"), ("model.md", "gin"), ("balancing.md", "gin")} <= marked
    assert {b.kind for b in BLOCKS} <= {"sh", "gin"}


@pytest.mark.parametrize("block", GIN, ids=lambda b: b.name)
def test_gin_block_parses_and_takes_effect(block: Block):

    gin.clear_config()
    try:
        gin_utils.parse([], [block.text])
        for expression in block.check:
            assert eval(expression, {"gin": gin, "DataConfig": DataConfig}), (  # pylint: disable=eval-used
                f"{block.name}: `{expression}` is false after parsing the block")
    finally:
        gin.clear_config()


def test_data_md_refusal_of_iterator_bindings_is_true():
    # docs/data.md: a binding on an argument DataConfig passes is refused, naming the
    # DataConfig binding (before, `make_train_iterator.seq_len` silently did nothing).

    assert "`make_train_iterator.seq_len`) is refused" in (REPO / "docs/data.md").read_text()
    gin.clear_config()
    try:
        with pytest.raises(gin_utils.GinConfigError, match="DataConfig.seq_len"):
            gin_utils.parse([], ["make_train_iterator.seq_len = 256"])
    finally:
        gin.clear_config()


def _run_block(block: Block, workdirs: Path) -> str:
    """Runs the block's commands in order, returning their output; fails on the first
    command that exits non-zero."""
    output = []
    for words in block.commands():
        command = localise(words, sys.executable, workdirs)
        result = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True,
                                text=True, timeout=300, check=False)
        output.append(result.stdout + result.stderr)
        assert result.returncode == 0, (
            f"{block.name}: `{shlex.join(words)}` exited {result.returncode}:\n"
            f"{output[-1][-3000:]}")
    return "\n".join(output)


def _run_block_once(tmp_path_factory, block: Block) -> tuple[Path, str]:
    """Runs `block` once per pytest session (xdist workers share it): its workdirs and
    output."""
    name = "docs_" + re.sub(r"\W", "_", block.name)
    directory = shared_dir(tmp_path_factory, name)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = directory.parent / f"{name}.output.json"
        if not record.exists():
            directory.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(_run_block(block, directory)))
        return directory, json.loads(record.read_text())


@pytest.mark.parametrize("block", SH, ids=lambda b: b.name)
def test_shell_block_runs_and_shows_the_documented_outcome(block: Block, tmp_path_factory):
    _, output = _run_block_once(tmp_path_factory, block)
    for line in block.expect:
        assert line in output, f"{block.name}: expected {line!r} in the output:\n{output[-3000:]}"


def test_upcycling_command_is_exact_as_documented():
    # The documented --verify output says exact; the runnable block expects it.
    block = next(b for b in SH if b.path.name == "upcycling.md")
    assert block.expect == ["expected exact (<= 1e-05 x max |logit|", "in fp32): OK"]
    shown = (REPO / "docs/upcycling.md").read_text()
    assert re.search(r"^expected exact \(<= 1e-05 x max \|logit\| .* in fp32\): OK$", shown, re.M)


def test_readme_lists_every_script():
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `scripts/` |"))
    listed = set(re.findall(r"`(\w+\.py)`", row))
    present = {p.name for p in (REPO / "scripts").glob("*.py")}
    assert listed == present, f"missing: {sorted(present - listed)}, stale: {sorted(listed - present)}"


# Tags only some runs write (an EvoMoE phase plan, zero-computation experts, a known peak);
# every other documented tag must appear in the README's tiny MoE run.
# train/mfu: only where the device's peak is known (not on CPU, experiments/train/throughput.py).
CONDITIONAL_TAGS = {"train/phase", "train/gate_temperature", "train/null_fraction", "train/mfu",
                    # multi-token prediction and its lambda schedule (docs/model.md)
                    "train/mtp_loss", "train/mtp/loss_depth_<i>", "train/loss_weight/mtp_weight"}


def _documented_tags() -> set[str]:
    text = (REPO / "docs/training.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`((?:train|valid|moe)/[^`\s]+)`", section))


def _pattern(tag: str) -> re.Pattern:
    placeholders = {"<layer>": r"layer_\d+", "<domain>": r"[a-z]+", "<i>": r"\d+"}
    regex = re.escape(tag)
    for name, value in placeholders.items():
        regex = regex.replace(re.escape(name), value)
    return re.compile(regex + "$")


def test_training_md_lists_the_tensorboard_tags_a_run_writes(tmp_path_factory):
    readme = next(b for b in SH if b.path.name == "README.md")
    workdirs, _ = _run_block_once(tmp_path_factory, readme)
    events = ea.EventAccumulator(str(workdirs / "long" / "tensorboard"),
                                 size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    events.Reload()
    written = set(events.Tags()["scalars"]) | set(events.Tags()["histograms"])
    documented = _documented_tags()
    patterns = {tag: _pattern(tag) for tag in documented}
    undocumented = sorted(t for t in written if not any(p.match(t) for p in patterns.values()))
    assert not undocumented, f"docs/training.md does not list: {undocumented}"
    unwritten = sorted(tag for tag, p in patterns.items()
                       if tag not in CONDITIONAL_TAGS and not any(p.match(t) for t in written))
    assert not unwritten, f"docs/training.md lists tags a MoE run does not write: {unwritten}"
