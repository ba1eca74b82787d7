"""Docstring fragments shared by several public functions (write each parameter once)."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

doc_sdata = """\
sdata
    SpatialData object in the stpred contract (see :func:`stpred.io.read_legacy_st`)."""

doc_sdata_any = """\
sdata
    SpatialData object: from an :mod:`stpred.io` reader, or as :mod:`spatialdata_io` readers return it (see
    :func:`stpred.io.adopt` for how its elements are found). Or an AnnData in scanpy's Visium layout
    (``obsm["spatial"]``, ``uns["spatial"]``); results are then written back into it (``obsm["stpred_*"]``,
    ``uns["stpred"]``)."""

doc_table_key = """\
table_key
    Name of the table in ``sdata.tables`` that holds raw counts."""

doc_sections = """\
sections
    Names of the sections (values of ``obs["section"]``) to use; ``None`` uses all of them."""

doc_overwrite = """\
overwrite
    Replace an existing output of the same name. By default an existing output is never replaced."""


def doc_params(**fragments: str) -> Callable[[F], F]:
    """Splice shared parameter descriptions into a docstring's ``{name}`` placeholders."""

    def deco(fn: F) -> F:
        doc = inspect.cleandoc(fn.__doc__ or "")
        fn.__doc__ = doc.format(**{k: textwrap.dedent(v).strip("\n") for k, v in fragments.items()})
        return fn

    return deco
