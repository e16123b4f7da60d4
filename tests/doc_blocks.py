"""Runnable blocks of the Markdown docs, for tests/test_docs.py.

A fenced block is runnable when an HTML comment right before it (blank lines
allowed in between) starts with `runnable:`; the comment is invisible in the
rendered page. Its first line names the kind, then one directive per line:

    <!-- runnable: sh
    tiny scripts/train.py: --gin_file=gin_configs/experiments/test_tiny.gin
    skip: make
    expect: in fp32): OK
    -->

- `runnable: sh`: every command of the block is run from the repository root
  (`.venv/bin/python` is the test's interpreter, `workdirs/...` a temporary
  directory) and must exit 0. `tiny <text>: <args>` appends `<args>` to each
  command that contains `<text>` (later flags win, so this shrinks a run);
  `skip: <text>` leaves out the commands that start with `<text>`; `expect:
  <line>` is a line the block's output (stdout and stderr) must contain.
- `runnable: gin`: the block is parsed as gin bindings (every configurable and
  parameter must exist and be bindable); `check: <python expression>` must be
  true afterwards (names: `gin`, `DataConfig`).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!--\s*runnable:\s*(\w+)(.*?)-->\s*$", re.S)


@dataclasses.dataclass
class Block:
    """One runnable fenced block."""

    path: Path
    line: int
    kind: str
    text: str
    tiny: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    skip: list[str] = dataclasses.field(default_factory=list)
    expect: list[str] = dataclasses.field(default_factory=list)
    check: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"

    def commands(self) -> list[list[str]]:
        """The block's shell commands (continuations joined, comments dropped), each
        with its tiny arguments, without the skipped ones."""
        joined = self.text.replace("\\\n", " ")
        out = []
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if not words or any(line.strip().startswith(s) for s in self.skip):
                continue
            for pattern, extra in self.tiny:
                if pattern in line:
                    words += extra
            out.append(words)
        return out


def _parse_directives(block: Block, body: str) -> None:
    for raw in body.strip().splitlines():
        key, _, value = raw.strip().partition(":")
        value = value.strip()
        if key.startswith("tiny "):
            block.tiny.append((key[len("tiny "):].strip(), shlex.split(value)))
        elif key in ("skip", "expect", "check"):
            getattr(block, key).append(value)
        else:
            raise ValueError(f"{block.name}: unknown runnable directive {raw.strip()!r}")


def runnable_blocks(paths: list[Path]) -> list[Block]:
    """Every runnable block of `paths`, in order."""
    blocks = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for fence in _FENCE.finditer(text):
            marker = _MARKER.search(text[:fence.start()].rsplit("```", 1)[-1])
            if marker is None:
                continue
            block = Block(path=path, line=text[:fence.start()].count("\n") + 1,
                          kind=marker.group(1), text=fence.group(2))
            _parse_directives(block, marker.group(2))
            blocks.append(block)
    return blocks


def localise(words: list[str], python: str, workdirs: Path) -> list[str]:
    """The command with the repository's venv python replaced by `python` and
    `workdirs/` paths moved under `workdirs`."""
    if words and words[0] == ".venv/bin/python":
        words = [python, *words[1:]]
    return [re.sub(r"(?<![\w/])workdirs/", f"{workdirs}/", w) for w in words]
