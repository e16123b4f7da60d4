"""The notebooks: each .ipynb is in sync with its jupytext py:percent twin and
stored without outputs, and each runs end to end with NB_SMOKE=1 in a real Jupyter
kernel (on 2 simulated CPU devices so the mesh code really shards) and displays an
image in every cell that draws. Their shared Colab
set-up helper (experiments/runtime/colab.py) picks the JAX build of the runtime."""

import ast
import json
import re
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


def _kernel_env(workdir: Path) -> dict[str, str]:
    """The kernel's environment: NB_SMOKE sizes, 2 simulated CPU devices (the mesh code
    shards for real), and no MPLBACKEND, so the kernel keeps Jupyter's inline backend."""
    env = script_env(num_devices=2)
    env.pop("MPLBACKEND", None)
    env.update(NB_SMOKE="1", NB_WORKDIR=str(workdir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _execute_in_kernel(name: str, tmp_path: Path):
    """Executes notebooks/<name>.ipynb in a real IPython kernel of this interpreter, from
    notebooks/ as a user's Jupyter would; returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
    from jupyter_client.manager import AsyncKernelManager  # pylint: disable=g-import-not-at-top

    # A kernelspec for this interpreter (not whatever `python` is first on PATH).
    spec_dir = tmp_path / "kernels" / "sparse-moe-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sparse-moe test", "language": "python"}))
    manager = AsyncKernelManager(
        kernel_name="sparse-moe-test",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, km=manager, timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    try:
        client.execute(env=_kernel_env(workdir))
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name}.ipynb failed in the kernel:\n{str(error)[-4000:]}")
    return notebook


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_in_a_jupyter_kernel_and_draws(name, tmp_path):
    # As a user runs it: a Jupyter kernel with the inline backend. Every cell that calls
    # plt.show() is meant to draw and must display a PNG (a library call that switched
    # matplotlib to Agg would leave it without one).
    notebook = _execute_in_kernel(name, tmp_path)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    printed = "".join(_text(c.outputs) for c in code)
    assert "SIZE=smoke" in printed
    assert "devices: [CpuDevice(id=0), CpuDevice(id=1)]" in printed
    drawing = [c for c in code if "plt.show()" in c.source]
    assert drawing, f"{name}: no cell draws"
    for cell in drawing:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, (f"{name}: the cell starting {cell.source.splitlines()[0]!r} drew no "
                        f"image (outputs: {[o.get('output_type') for o in cell.outputs]}, "
                        f"text: {_text(cell.outputs)[-500:]!r})")


def _extras() -> dict[str, list[str]]:
    tree = ast.parse((REPO / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "EXTRAS_REQUIRE")
    return ast.literal_eval(node.value)


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_notebooks_extra_installs_what_the_docs_tell_users_to_run():
    docs = (REPO / "docs" / "notebooks.md").read_text()
    extras = _extras()
    assert 'pip install -e ".[notebooks]"' in docs
    if "jupyter lab" in docs:
        assert "jupyterlab" in _names(extras["notebooks"])
    if "jupyter notebook" in docs:
        assert "notebook" in _names(extras["notebooks"])
    # `make test` installs .[dev]: the kernel run above needs these.
    assert {"nbclient", "ipykernel", "nbformat", "jupytext"} <= _names(extras["dev"])
