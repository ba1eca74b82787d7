"""Package-level guarantees: fast import, lazy heavy dependencies, README/CI agreement, public docstrings."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_lazy():
    code = (
        "import sys; import stpred; "
        "heavy = [m for m in ('torch', 'lightning', 'squidpy', 'spatialdata', 'spatialdata_plot', 'scanpy') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == ""


def test_namespaces_do_not_import_lightning_or_squidpy():
    code = (
        "import sys, stpred; stpred.pp; stpred.tl; stpred.pl; stpred.io; stpred.datasets; "
        "print(','.join(m for m in ('lightning', 'squidpy', 'spatialdata_plot') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("python -m stpred demo")
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "ruff check" in ci
    for c in commands:
        assert c.index("pip install -q torch==2.13.0") < c.index("-c constraints.txt")


@pytest.mark.parametrize("namespace", ["io", "datasets", "pp", "tl", "pl", "models"])
def test_public_names_resolve_and_have_numpy_docstrings(namespace):
    import importlib

    mod = importlib.import_module(f"stpred.{namespace}")
    for name in mod.__all__:
        obj = getattr(mod, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"stpred.{namespace}.{name} has no docstring"
        assert "{" not in doc.split("\n")[0], f"unfilled placeholder in stpred.{namespace}.{name}"
        if inspect.isfunction(obj) and inspect.signature(obj).parameters:
            assert "Parameters\n----------" in doc, f"stpred.{namespace}.{name} lacks a Parameters section"
