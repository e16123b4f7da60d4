"""seqio stays optional: the core never imports seqio or TensorFlow, and a
'seqio:' source without the extra fails with a message naming it."""

import importlib.util
import subprocess
import sys

import pytest

from experiments.data.config import DataConfig
from tests.helpers import REPO, script_env

HAVE_SEQIO = importlib.util.find_spec("seqio") is not None

# Everything a grain training run imports, plus the script's own imports.
CORE_IMPORTS = """
import sys
import moe, layers, experiments.train.trainer, experiments.data.config, experiments.data.pipeline
import experiments.data.tokenizers, experiments.data.sources, experiments.reporting.analysis
from experiments.runtime import gin_utils
gin_utils.parse(["gin_configs/experiments/default.gin"], [])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("seqio", "tensorflow",
                                                              "tensorflow_text"))
print(heavy)
"""


def test_core_imports_neither_seqio_nor_tensorflow():
    # A fresh interpreter: in this process pytest may have imported anything.
    result = subprocess.run([sys.executable, "-c", CORE_IMPORTS], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(HAVE_SEQIO, reason="seqio is installed; this checks the message without it")
def test_seqio_source_without_the_extra_names_it():
    config = DataConfig(source="seqio:sparse_moe_embedded")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[seqio\]'"):
        config.vocab_size()
