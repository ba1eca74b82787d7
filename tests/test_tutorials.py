"""Run the tutorial notebooks end to end in their small CI configuration (``STPRED_TUTORIAL_FAST=1``).

Each notebook runs in a fresh kernel of *this* interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``,
so it works in any virtual environment, activated or not), in a temporary working directory, with a per-cell
timeout. A failing cell fails the test with the cell's traceback. Set ``STPRED_TUTORIAL_OUT`` to a folder to keep
the executed notebooks (with their figures).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorial tests need nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the tutorial tests need nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="the tutorial tests need ipykernel (pip install -e '.[test]')")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
KERNEL = "stpred-tutorial-test"
#: Seconds any one cell may run in FAST mode (the slowest cell trains a model).
CELL_TIMEOUT = 300


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that starts ``sys.executable`` (not whatever ``python`` is first on PATH), and FAST mode."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("STPRED_TUTORIAL_FAST", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's frozen-modules notice on stderr
    # figures render inline in the kernel (the test session's Agg backend would hide them)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return KERNEL


def _run(name: str, kernel: str, workdir: Path) -> tuple[object, float]:
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    out = os.environ.get("STPRED_TUTORIAL_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / name)
    return nb, seconds


def _outputs(nb: object, kind: str) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == kind]


def _check_executed(nb: object) -> None:
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(c.get("execution_count") for c in code), "a code cell was not executed"
    assert not _outputs(nb, "error")
    images = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"expected the notebook to draw its figures, found {len(images)} image(s)"


def test_notebooks_are_stored_without_outputs() -> None:
    for path in sorted(TUTORIALS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: strip the outputs before committing"
                assert cell.execution_count is None, f"{path.name}: strip the execution counts before committing"


def test_quickstart(kernel_env: str, tmp_path: Path) -> None:
    nb, seconds = _run("01_quickstart.ipynb", kernel_env, tmp_path)
    _check_executed(nb)
    # the notebook saved its predictor in the working directory, not in the repository
    assert (tmp_path / "quickstart_predictor").is_dir()
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "train on" in text
    print(f"01_quickstart.ipynb ran in {seconds:.0f} s")


@pytest.mark.her2st
def test_her2st(kernel_env: str, tmp_path: Path, her2st_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STPRED_HER2ST", str(her2st_path))
    nb, seconds = _run("02_her2st.ipynb", kernel_env, tmp_path)
    _check_executed(nb)
    print(f"02_her2st.ipynb ran in {seconds:.0f} s")


@pytest.mark.her2st
def test_he_only(kernel_env: str, tmp_path: Path, her2st_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STPRED_HER2ST", str(her2st_path))
    nb, seconds = _run("03_he_only.ipynb", kernel_env, tmp_path)
    _check_executed(nb)
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    # the H&E-only object was tiled, and the predictions were scored against C6's measurement and the baseline
    assert "C6_tiles55 " in text
    assert "vs baseline" in text
    print(f"03_he_only.ipynb ran in {seconds:.0f} s")
