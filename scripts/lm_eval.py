"""lm-evaluation-harness on our checkpoints: lm-eval's own CLI with the `sparse_moe` model.

  python scripts/lm_eval.py --model sparse_moe --model_args workdir=workdirs/imported \
      --tasks hellaswag --limit 100
  python scripts/lm_eval.py --model sparse_moe --model_args workdir=W,batch_size=16 \
      --include_path my_tasks/ --tasks my_task

lm-eval has no plugin entry point for models: this script imports
experiments/inference/lm_eval_adapter.py (which registers `sparse_moe`) and then
runs lm-eval's CLI with the same arguments (all of lm-eval's flags work; see
`lm_eval --help`). Needs the `lm_eval` package (the interop venv); see
docs/interop.md "lm-eval-harness".
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    # This file is named lm_eval.py: drop its directory from the path so that
    # `import lm_eval` finds the package, not this script.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
    except ImportError:
        print("error: scripts/lm_eval.py needs the lm_eval package "
              "(pip install 'lm-eval>=0.4.13,<0.5')", file=sys.stderr)
        sys.exit(2)
    from experiments.inference import lm_eval_adapter  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    cli_evaluate()


if __name__ == "__main__":
    main()
