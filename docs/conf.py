"""Sphinx configuration for the stpred documentation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

project = "stpred"
author = "stpred developers"
copyright = "2026, stpred developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# attributes as fields of the class docstring (dataclass fields would otherwise be documented twice)
napoleon_use_ivar = True
# stpred's "Returns" sections are prose ("Nothing; writes ..."), not "name : type" lists: an unknown style name
# ("prose") makes napoleon render the section as a plain rubric with the text as written
napoleon_custom_sections = [("Batch keys", "params_style"), ("Returns", "prose")]
myst_enable_extensions = ["dollarmath", "colon_fence"]
# the tutorials are executed by the test suite (tests/test_tutorials.py), not by Sphinx
nb_execution_mode = "off"
source_suffix = {
    ".rst": "restructuredtext",
    ".md": "myst-nb",
    ".ipynb": "myst-nb",
}  # .rst first: autosummary writes .rst
exclude_patterns = ["_build", "generated/*.ipynb", "**.ipynb_checkpoints"]
html_theme = "pydata_sphinx_theme"
html_title = "stpred"
templates_path = ["_templates"]
html_static_path: list[str] = []
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]
nitpicky = False

# The tutorials live in ../tutorials (where users find them); Sphinx reads a copy under notebooks/.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "tutorials").is_dir():
    import shutil

    shutil.copytree(_ROOT / "tutorials", Path(__file__).parent / "notebooks", dirs_exist_ok=True)
