"""The README opens with the two newcomer commands, and its Python example runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_make_train_and_make_test():
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands[:2] == ["make train", "make test"]


def test_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape
    assert {"lbl", "z_loss", "counts", "dropped_fraction"} <= {n for n, _ in namespace["aux"].items()}
