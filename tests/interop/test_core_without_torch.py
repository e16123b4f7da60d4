"""torch and transformers stay optional: importing moe, layers, every experiments
module and every script never imports them (the interop venv has them installed,
the core venv does not; this test runs in both)."""

import subprocess
import sys

from tests.helpers import REPO, script_env

HEAVY = ("torch", "transformers", "lm_eval")
# The seqio bridge needs TensorFlow, the optional 'seqio' extra (tests/data/test_seqio_optional.py).
# The lm-eval adapter is an lm_eval plugin (scripts/lm_eval.py imports it only when
# run): it imports lm_eval itself.
SKIP = ("experiments.data.seqio_bridge", "experiments.data.seqio_tasks",
        "experiments.inference.lm_eval_adapter")

IMPORT_ALL = f"""
import importlib, importlib.util, pathlib, pkgutil, sys
import moe, layers, experiments
for package in (moe, layers, experiments):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name not in {SKIP!r}:
            importlib.import_module(info.name)
scripts = sorted(pathlib.Path("scripts").glob("*.py"))
assert scripts
for path in scripts:
    spec = importlib.util.spec_from_file_location("script_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
print(len(scripts), sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
"""


def test_core_imports_neither_torch_nor_transformers():
    # A fresh interpreter: in this process pytest may have imported anything.
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    count, heavy = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 10
    assert heavy == "[]"
