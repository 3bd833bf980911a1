"""The notebooks in colab/: each runs top to bottom in FAST mode, and the committed copies carry no outputs.

Every ``colab/*.ipynb`` is picked up, so a new notebook is tested without editing this file. The
notebooks share one workdir root per session (``DIFFUSION_JAX_WORKDIR``), so the sampling tour
reuses the digits run the quickstart trained, and one JAX compilation cache.

To look at the figures the notebooks drew, set ``DIFFUSION_JAX_NOTEBOOK_EXPORT=<dir>``: every
image output is written to ``<dir>/<notebook>/NN.png`` and the executed notebook to
``<dir>/<notebook>/<notebook>.ipynb``, with the execution time in ``<dir>/<notebook>/time.txt``.
"""

from __future__ import annotations

import base64
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def _ids(paths):
    return [p.stem for p in paths]


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    env = {
        "DIFFUSION_JAX_FAST": "1",
        "DIFFUSION_JAX_WORKDIR": str(root / "runs"),
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return env


def _export(nb, name: str, seconds: float, folder: str) -> None:
    out = pathlib.Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    count = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                count += 1
                (out / f"{count:02d}.png").write_bytes(base64.b64decode(png))
    nbformat.write(nb, out / f"{name}.ipynb")
    (out / "time.txt").write_text(f"{seconds:.1f} s\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, notebook_env, monkeypatch):
    from nbclient import NotebookClient

    matplotlib = pytest.importorskip("matplotlib")
    del matplotlib
    for key, value in notebook_env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},  # the kernel's cwd: configs/ imports
    )
    start = time.time()
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    seconds = time.time() - start
    print(f"{path.name}: {seconds:.1f} s", file=sys.stderr)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images > 0, f"{path.name} drew no figure"
    export = os.environ.get("DIFFUSION_JAX_NOTEBOOK_EXPORT")
    if export:
        _export(nb, path.stem, seconds, export)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_outputs_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs; rebuild the notebooks"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


def test_notebooks_exist_and_match_their_source():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "toy_2d", "sampling_tour", "schedules"}
    sys.path.insert(0, str(REPO / "colab"))
    try:
        import build_notebooks
    finally:
        sys.path.remove(str(REPO / "colab"))
    for name, cells in build_notebooks.NOTEBOOKS.items():
        expected = nbformat.writes(build_notebooks.build(name, cells)) + "\n"
        actual = (REPO / "colab" / f"{name}.ipynb").read_text()
        assert actual == expected, f"colab/{name}.ipynb differs from colab/build_notebooks.py"
