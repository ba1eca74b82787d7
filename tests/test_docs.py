"""The documentation builds without a single warning, and its API reference lists every public name."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Namespaces whose ``__all__`` must appear in ``docs/api.md`` (as ``<namespace>.<name>`` autosummary entries).
NAMESPACES = ("io", "datasets", "pp", "tl", "pl", "models", "models.encoders", "metrics", "train")


def _api_entries() -> set[str]:
    text = (DOCS / "api.md").read_text()
    return set(re.findall(r"^\s{3}([A-Za-z_][\w.]*)\s*$", text, flags=re.MULTILINE))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_api_reference_lists_every_public_name(namespace: str) -> None:
    module = importlib.import_module(f"stpred.{namespace}")
    missing = sorted(f"{namespace}.{name}" for name in module.__all__ if f"{namespace}.{name}" not in _api_entries())
    assert not missing, f"add these public names to an autosummary list in docs/api.md: {missing}"


def test_api_reference_has_no_stale_entries() -> None:
    stale = []
    for entry in sorted(_api_entries()):
        module, _, name = f"stpred.{entry}".rpartition(".")
        if not hasattr(importlib.import_module(module), name):
            stale.append(entry)
    assert not stale, f"docs/api.md lists names that do not exist: {stale}"


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """``sphinx-build -W``: any warning (broken docstring markup, missing page, bad reference) fails the build.

    The build runs on a copy of ``docs/``, ``tutorials/`` and ``CHANGELOG.md`` so that it never writes into the
    checkout (autosummary pages, the notebooks copied by ``conf.py``).
    """
    pytest.importorskip("sphinx", reason="building the docs needs sphinx (pip install -e '.[doc]')")
    pytest.importorskip("myst_nb", reason="building the docs needs myst-nb (pip install -e '.[doc]')")
    pytest.importorskip("pydata_sphinx_theme", reason="building the docs needs pydata-sphinx-theme")
    src = tmp_path / "repo"
    ignore = shutil.ignore_patterns("_build", "generated", "notebooks", ".ipynb_checkpoints")
    shutil.copytree(DOCS, src / "docs", ignore=ignore)
    shutil.copytree(ROOT / "tutorials", src / "tutorials", ignore=ignore)
    shutil.copy2(ROOT / "CHANGELOG.md", src / "CHANGELOG.md")
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html"]
    cmd += ["-d", str(tmp_path / "doctrees"), str(src / "docs"), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr[-8000:]}"
    notebooks = ("notebooks/01_quickstart", "notebooks/02_her2st", "notebooks/03_he_only")
    for page in ("index", "api", "models", "metrics", "tutorials", *notebooks):
        assert (out / f"{page}.html").is_file(), f"{page}.html was not built"
    api = (out / "generated" / "stpred.tl.fit.html").read_text()
    assert "Train a model on the sections that have measured expression" in api, "autodoc did not render docstrings"
    print(f"sphinx-build took {seconds:.0f} s")
