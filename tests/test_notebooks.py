"""The notebooks: each .ipynb is in sync with its jupytext py:percent twin and
stored without outputs, and each runs end to end with NB_SMOKE=1 (as a script,
on 2 simulated CPU devices so the mesh code really shards). Their shared Colab
set-up helper (experiments/runtime/colab.py) picks the JAX build of the runtime."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from experiments.runtime import colab
from tests.helpers import REPO, script_env

NOTEBOOKS = REPO / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
EXPECTED = ["01_moe_layer_tour", "02_train_and_inspect", "03_upcycle_a_checkpoint"]


def test_every_notebook_is_a_pair():
    assert NAMES == EXPECTED
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


def _cells(notebook) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


@pytest.mark.parametrize("name", EXPECTED)
def test_ipynb_matches_percent_file_and_has_no_outputs(name):
    jupytext = pytest.importorskip("jupytext")
    ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    percent = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert _cells(ipynb) == _cells(percent), (
        f"{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py`")
    raw = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{name}.ipynb holds outputs: strip them (jupytext --sync from the .py)")
    assert raw["metadata"]["jupytext"]["formats"] == "ipynb,py:percent"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_opens_with_a_guarded_colab_setup_cell(name):
    # The first cell fetches the repository on Colab only, then hands the install to the
    # shared helper; the rest of the notebook imports the project after it.
    percent = (NOTEBOOKS / f"{name}.py").read_text()
    first_code = percent.split("# %%\n")[1]
    assert 'if "google.colab" in sys.modules and not Path("setup.py").exists():' in first_code
    assert "from experiments.runtime import colab" in first_code
    assert first_code.rstrip().endswith("colab.install(ROOT)")
    assert 'print("devices:", jax.devices())' in percent
    assert 'os.environ.get("NB_SMOKE") == "1"' in percent


def test_colab_helper_imports_no_jax():
    # The first cell imports it before the install, which may replace jax.
    code = "import sys, experiments.runtime.colab; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), check=True)


@pytest.mark.parametrize("devices, env, extra", [
    ({"/dev/accel0"}, {}, "tpu"), (set(), {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "tpu"),
    ({"/dev/nvidia0"}, {}, "gpu"), (set(), {}, None)])
def test_colab_install_picks_the_jax_build_of_the_runtime(monkeypatch, devices, env, extra):
    monkeypatch.setattr(colab.os.path, "exists", lambda path: path in devices)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    commands = []
    monkeypatch.setattr(colab.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    colab.install(Path("/content/sparse-moe"))
    assert commands == []  # outside Colab: nothing
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    colab.install(Path("/content/sparse-moe"))
    spec = "/content/sparse-moe" + (f"[{extra}]" if extra else "")
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", "-e", spec]]


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_with_nb_smoke(name, tmp_path):
    env = script_env(num_devices=2)
    env.update(NB_SMOKE="1", MPLBACKEND="Agg", NB_WORKDIR=str(tmp_path),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    result = subprocess.run([sys.executable, f"{name}.py"], cwd=NOTEBOOKS, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "SIZE=smoke" in result.stdout
    assert "devices: [CpuDevice(id=0), CpuDevice(id=1)]" in result.stdout
