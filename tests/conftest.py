"""Shared fixtures: a tiny synthetic data set built once per session and copied per test; the real HER2 path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Test tensors are small: one thread per process avoids OpenMP oversubscription when pytest-xdist runs one
# worker per core (set before anything imports torch).
os.environ.setdefault("OMP_NUM_THREADS", "1")

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Default location of the real HER2 data, next to the repository.
HER2ST_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests when no CUDA device is available (torch is imported only if needed)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def _sdata_once() -> SpatialData:
    import stpred

    return stpred.datasets.synthetic(n_sections=2, n_genes=8, seed=0)


@pytest.fixture
def sdata(_sdata_once: SpatialData) -> SpatialData:
    """A fresh copy of a 2-section synthetic data set (8 genes, about 120 spots per section); change it freely."""
    import spatialdata

    return spatialdata.deepcopy(_sdata_once)


@pytest.fixture(scope="session")
def her2st_path() -> Path:
    """Folder of the real HER2 data (``STPRED_HER2ST`` or ``../shared/data/her2st``); skips the test when absent."""
    env = os.environ.get("STPRED_HER2ST")
    path = Path(env) if env else HER2ST_DEFAULT
    if not (path / "ST-cnts").is_dir():
        pytest.skip(f"real HER2 data not found at {path}; set STPRED_HER2ST")
    return path


def _assert_contract(sdata: SpatialData) -> None:
    """Check that ``sdata`` follows the stpred SpatialData contract (``DESIGN.md``, ``COMMON.md``)."""
    import numpy as np
    import pandas as pd
    import xarray as xr
    from scipy import sparse
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import Identity, get_transformation

    table = sdata.tables["table"]
    assert sparse.isspmatrix_csr(table.X) or isinstance(table.X, sparse.csr_array)
    assert table.X.dtype == np.float32
    assert table.var_names.is_unique
    assert table.obs_names.is_unique
    obs = table.obs
    for column in ("region", "section", "patient"):
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    for column in ("spot_id", "array_x", "array_y"):
        assert np.issubdtype(obs[column].dtype, np.integer), column
    assert table.obsm["spatial"].dtype == np.float64
    assert table.obsm["spatial"].shape == (table.n_obs, 2)
    sections = list(obs["section"].cat.categories)
    regions, region_key, instance_key = get_table_keys(table)
    assert (region_key, instance_key) == ("region", "spot_id")
    assert sorted(np.atleast_1d(regions)) == sorted(f"{s}_spots" for s in sections)
    uns = table.uns["stpred"]
    for key in ("mpp", "spot_diameter_um", "pitch_um", "technology"):
        assert sorted(uns[key]) == sorted(sections), key
    for section in sections:
        rows = obs["section"] == section
        sub = obs[rows]
        assert (sub["region"] == f"{section}_spots").all()
        assert all(name.startswith(f"{section}_") for name in sub.index)
        image = sdata.images[f"{section}_hne"]
        assert isinstance(image, xr.DataTree)
        assert "scale1" in image
        scale0 = image["scale0"]["image"]
        assert scale0.dims == ("c", "y", "x")
        assert scale0.dtype == np.uint8
        assert scale0.shape[0] == 3
        assert isinstance(get_transformation(image, to_coordinate_system=section), Identity)
        shapes = sdata.shapes[f"{section}_spots"]
        assert isinstance(get_transformation(shapes, to_coordinate_system=section), Identity)
        assert (shapes.index.to_numpy() == np.arange(len(shapes))).all()
        assert (shapes["radius"] > 0).all()
        assert sorted(sub["spot_id"]) == list(range(len(shapes)))
        geometry = shapes.loc[sub["spot_id"].to_numpy()].geometry
        np.testing.assert_allclose(np.c_[geometry.x, geometry.y], table.obsm["spatial"][rows.to_numpy()])
        _, height, width = scale0.shape
        xy = table.obsm["spatial"][rows.to_numpy()]
        assert (xy >= 0).all()
        assert (xy[:, 0] < width).all()
        assert (xy[:, 1] < height).all()
        assert uns["mpp"][section] > 0
        # circles leave gaps between spots; square bins (Visium HD, Xenium pseudo-spots) tile the plane
        assert uns["pitch_um"][section] >= uns["spot_diameter_um"][section] > 0


@pytest.fixture(scope="session")
def assert_contract():
    """A function that asserts a SpatialData object follows the stpred contract."""
    return _assert_contract


def _pooled_vs_training_mean(
    sdata: SpatialData, key: str, *, train: list[str], test: list[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Pooled test-section metrics of layer ``key`` and of the training-mean baseline (a layer added here)."""
    import numpy as np

    import stpred

    table = sdata.tables["stpred"]
    rows = table.obs["section"].isin(train).to_numpy()
    mean = table.layers["target"][rows].mean(0)
    table.layers["baseline_mean"] = np.broadcast_to(mean, table.shape).astype(np.float32)
    scores = []
    for layer in (key, "baseline_mean"):
        frame = stpred.tl.evaluate(sdata, layer, sections=test).query("section == 'pooled'")
        scores.append(dict(zip(frame["metric"], frame["value"])))
    return scores[0], scores[1]


@pytest.fixture
def against_training_mean():
    """``f(sdata, key, train=[...], test=[...]) -> (model_scores, baseline_scores)``, pooled over ``test``."""
    return _pooled_vs_training_mean


def _table_state(table: object) -> dict:
    """Copies of everything a refused call must leave alone in one AnnData table."""
    import copy

    import numpy as np

    def dense(x: object) -> np.ndarray:
        return np.array(x.toarray() if hasattr(x, "toarray") else x, copy=True)

    return {
        "shape": table.shape,
        "X": dense(table.X),
        "obs": table.obs.copy(),
        "var": table.var.copy(),
        "obsm": {k: dense(v) for k, v in table.obsm.items()},
        "layers": {k: dense(v) for k, v in table.layers.items()},
        "uns": copy.deepcopy(dict(table.uns)),
    }


def _assert_same(before: object, after: object, where: str) -> None:
    import numpy as np
    import pandas as pd

    if isinstance(before, dict):
        assert isinstance(after, dict), where
        assert sorted(map(str, before)) == sorted(map(str, after)), f"keys of {where} changed"
        for k in before:
            _assert_same(before[k], after[k], f"{where}[{k!r}]")
    elif isinstance(before, pd.DataFrame):
        pd.testing.assert_frame_equal(before, after, obj=where)
    elif isinstance(before, np.ndarray | list | tuple) and not isinstance(before, str):
        a, b = np.asarray(before), np.asarray(after)
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} → {b.dtype}"
            np.testing.assert_array_equal(a, b, err_msg=where)  # NaN equals NaN here
        else:
            np.testing.assert_array_equal(np.asarray(before, dtype=object), np.asarray(after, dtype=object), where)
    else:
        assert before == after or (before != before and after != after), f"{where}: {before!r} → {after!r}"


class _Unchanged:
    """``with assert_unchanged(sdata): call()``: the SpatialData (or AnnData) is exactly as before the block."""

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def _state(self) -> dict:
        from anndata import AnnData

        if isinstance(self.obj, AnnData):
            return {"table": _table_state(self.obj)}
        kinds = ("images", "labels", "points", "shapes", "tables")
        return {
            "elements": {kind: sorted(getattr(self.obj, kind)) for kind in kinds},
            "tables": {name: _table_state(t) for name, t in self.obj.tables.items()},
        }

    def __enter__(self) -> _Unchanged:
        self.before = self._state()
        return self

    def __exit__(self, *exc: object) -> None:
        _assert_same(self.before, self._state(), "sdata")


@pytest.fixture
def assert_unchanged():
    """``with assert_unchanged(sdata): ...``: fails if the block changed any element, table, layer, obsm or uns."""
    return _Unchanged
