from __future__ import annotations

import time

import numpy as np
import pytest

from stpred._lattice import lattice_indices


def _rule_bruteforce(xy: np.ndarray, unit: float) -> np.ndarray:
    """The documented placement rule, spot by spot over a full search box (slow, independent)."""
    pos = (xy - xy.min(0)) / unit
    n = len(pos)
    lo = -n - 2
    hi = int(np.ceil(pos.max())) + n + 2
    gx, gy = np.meshgrid(np.arange(lo, hi), np.arange(lo, hi), indexing="ij")
    cells = np.c_[gx.ravel(), gy.ravel()]  # lexicographic (x, y) order
    out = np.full((n, 2), np.iinfo(np.int64).min)
    taken: set[tuple[int, int]] = set()
    todo = list(range(n))
    while todo:
        claims = {}
        for i in todo:
            d2 = ((cells - pos[i]) ** 2).sum(1)
            free = np.array([(int(a), int(b)) not in taken for a, b in cells])
            d2[~free] = np.inf
            j = int(np.argmin(d2))  # first minimum = smallest (x, y) among ties
            claims.setdefault((int(cells[j, 0]), int(cells[j, 1])), []).append((d2[j], i))
        for cell, who in claims.items():
            _, winner = min(who)
            out[winner] = cell
            taken.add(cell)
        placed = {int(o) for o in np.flatnonzero(out[:, 0] != np.iinfo(np.int64).min)}
        todo = [i for i in todo if i not in placed]
    return out - out.min(0)


def _hex(nx: int, ny: int, pitch: float = 100.0) -> np.ndarray:
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    i, j = i.ravel(), j.ravel()
    return np.c_[i * pitch + (j % 2) * pitch / 2, j * pitch * np.sqrt(3) / 2]


def test_hand_case_nearest_free_and_priority():
    # B collides with A (A is nearer to cell (0,0)); C owns (1,0) in round 0 even though B is nearer to it than
    # to any other free cell would be in a first-come rule; B's two nearest free cells (0,-1) and (0,1) tie: the
    # smaller (x, y) wins. Then everything is shifted to start at 0.
    xy = np.array([[0.0, 0.0], [0.1, 0.0], [1.4, 0.0]])
    np.testing.assert_array_equal(lattice_indices(xy, 1.0), [[0, 1], [0, 0], [1, 1]])
    # nearest free cell by Euclidean distance, not the first free cell of a ring scan
    xy = np.array([[0.0, 0.0], [0.1, 0.45], [0.0, 1.0]])
    np.testing.assert_array_equal(lattice_indices(xy, 1.0), [[0, 0], [1, 0], [0, 1]])
    # halves round down
    np.testing.assert_array_equal(lattice_indices(np.array([[0.0, 0.0], [1.5, 0.0]]), 1.0), [[0, 0], [1, 0]])
    # an exact tie for the same cell goes to the lower row index; the loser's four nearest free cells tie and
    # the smallest (x, y) wins
    xy = np.array([[0.0, 5.0], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(lattice_indices(xy, 1.0), [[0, 5], [1, 0], [0, 0]])


@pytest.mark.filterwarnings("ignore:.*share a lattice cell")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_bruteforce_rule(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 5, (20, 2)) * 55.0  # 20 spots on ~36 cells: many collisions
    xy[5] = xy[3]  # an exact duplicate
    got = lattice_indices(xy, 55.0)
    np.testing.assert_array_equal(got, _rule_bruteforce(xy, 55.0))


@pytest.mark.filterwarnings("ignore:.*share a lattice cell")
def test_no_collisions_and_starts_at_zero():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-500, 3000, (3000, 2))
    out = lattice_indices(xy, 50.0)
    assert out.dtype == np.int64
    assert len(np.unique(out, axis=0)) == len(out)
    np.testing.assert_array_equal(out.min(0), [0, 0])
    # row order does not matter (no exact ties here)
    perm = rng.permutation(len(xy))
    np.testing.assert_array_equal(lattice_indices(xy[perm], 50.0), out[perm])


def test_visium_hex_maps_sensibly():
    xy = _hex(40, 40)
    xy = xy @ np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]])  # a rotated slide
    out = lattice_indices(xy, 55.0)
    assert len(np.unique(out, axis=0)) == len(out)
    p = (xy - xy.min(0)) / 55.0
    # a few spots may be displaced by one cell; all stay near their continuous position
    assert np.abs(out - np.ceil(p - 0.5) + np.ceil(p - 0.5).min(0)).max() <= 1
    assert np.mean((out - np.ceil(p - 0.5) + np.ceil(p - 0.5).min(0) == 0).all(1)) > 0.98
    # neighbours along a row are 100 / 55 = 1.8 cells apart
    d = np.linalg.norm(out[1:40] - out[:39], axis=1)
    assert np.all((d >= 1) & (d <= 3))


def test_legacy_square_grid():
    i, j = np.meshgrid(np.arange(12), np.arange(9), indexing="ij")
    grid = np.c_[i.ravel(), j.ravel()]
    rng = np.random.default_rng(0)
    xy = grid * 200.0 + 1000.0 + rng.normal(0, 10, grid.shape)  # 200 µm pitch, a little jitter
    np.testing.assert_array_equal(lattice_indices(xy, 100.0), 2 * grid)


def test_errors():
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        lattice_indices(np.zeros((3, 3)), 1.0)
    with pytest.raises(ValueError, match="at least one spot"):
        lattice_indices(np.zeros((0, 2)), 1.0)
    with pytest.raises(ValueError, match="finite"):
        lattice_indices(np.array([[0.0, np.nan]]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        lattice_indices(np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match="finite `unit_um`"):
        lattice_indices(np.zeros((2, 2)), np.inf)
    with pytest.raises(ValueError, match="do not fit"):
        lattice_indices(np.random.default_rng(0).uniform(0, 200, (100, 2)), 55.0)
    with pytest.raises(ValueError, match="larger `unit_um`"):
        lattice_indices(np.array([[0.0, 0.0], [1e9, 0.0]]), 1.0)
    with pytest.warns(UserWarning, match="share a lattice cell"):
        lattice_indices(np.random.default_rng(0).uniform(0, 550, (60, 2)), 55.0)


def test_speed_100k(capsys):
    xy = _hex(320, 313)[:100_000]
    t = time.perf_counter()
    out = lattice_indices(xy @ np.array([[1.0, 0.4], [0.0, 1.0]]), 55.0)  # sheared: some collisions
    dt = time.perf_counter() - t
    assert len(np.unique(out, axis=0)) == 100_000
    with capsys.disabled():
        print(f"\nlattice_indices on 100k sheared hex spots: {dt:.3f} s")


# ------------------------------------------------------------------------------------------- pp.lattice


def _sdata(technology: dict[str, str], *, mpp: dict[str, float] | None = None):
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import TableModel

    xy_a = _hex(6, 5)  # µm
    grid = np.c_[np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)]
    xy_b = grid * 200.0
    mpp = mpp if mpp is not None else {"A": 0.5, "B": 2.0}
    spatial = np.r_[xy_a / 0.5, xy_b / 2.0]
    n = len(spatial)
    obs = pd.DataFrame(
        {"section": pd.Categorical(["A"] * len(xy_a) + ["B"] * len(xy_b))}, index=[f"s{i}" for i in range(n)]
    )
    table = ad.AnnData(np.zeros((n, 3), dtype=np.float32), obs=obs)
    table.obsm["spatial"] = spatial
    table.uns["stpred"] = {
        "mpp": mpp,
        "technology": technology,
        "pitch_um": {"A": 100.0, "B": 200.0},
    }
    return sd.SpatialData(tables={"stpred": TableModel.parse(table)}), xy_a, grid


def test_pp_lattice_defaults_by_technology():
    import stpred

    sdata, xy_a, grid = _sdata({"A": "visium", "B": "legacy_st"})
    stpred.pp.lattice(sdata)
    table = sdata.tables["stpred"]
    out = table.obsm["lattice"]
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out[: len(xy_a)], lattice_indices(xy_a, 55.0))
    np.testing.assert_array_equal(out[len(xy_a) :], 2 * grid)
    assert table.uns["stpred"]["lattice"] == {"key": "lattice", "unit_um": {"A": 55.0, "B": 100.0}}
    assert any(k.endswith("_lattice") for k in table.uns["stpred"]["history"])


@pytest.mark.filterwarnings("ignore:.*share a lattice cell")
def test_pp_lattice_synthetic_and_explicit_units():
    import stpred

    sdata, _, grid = _sdata({"A": "synthetic", "B": "synthetic"})
    stpred.pp.lattice(sdata, key_added="lat")
    assert sdata.tables["stpred"].uns["stpred"]["lattice"]["unit_um"] == {"A": 50.0, "B": 100.0}
    stpred.pp.lattice(sdata, unit_um={"A": 55.0, "B": 200.0}, key_added="lat")
    np.testing.assert_array_equal(sdata.tables["stpred"].obsm["lat"][-len(grid) :], grid)
    stpred.pp.lattice(sdata, unit_um=100.0)
    assert sdata.tables["stpred"].uns["stpred"]["lattice"]["unit_um"] == {"A": 100.0, "B": 100.0}


def test_pp_lattice_errors():
    import stpred

    sdata, _, _ = _sdata({"A": "xenium", "B": "legacy_st"})
    with pytest.raises(ValueError, match="No default lattice unit for section 'A'"):
        stpred.pp.lattice(sdata)
    with pytest.raises(KeyError, match="no value for section 'B'"):
        stpred.pp.lattice(sdata, unit_um={"A": 55.0})
    with pytest.raises(ValueError, match="positive"):
        stpred.pp.lattice(sdata, unit_um=-1.0)
    with pytest.raises(KeyError, match="No table .stpred_missing."):
        stpred.pp.lattice(sdata, table_key="stpred_missing")
    with pytest.raises(TypeError, match="key_added"):
        stpred.pp.lattice(sdata, unit_um=55.0, key_added="")
    sdata, _, _ = _sdata({"A": "visium", "B": "legacy_st"}, mpp={"A": 0.5})
    with pytest.raises(KeyError, match=r"µm-per-pixel value for section\(s\) \['B'\]"):
        stpred.pp.lattice(sdata)
    del sdata.tables["stpred"].uns["stpred"]["mpp"]
    with pytest.raises(KeyError, match="no `uns"):
        stpred.pp.lattice(sdata)
    del sdata.tables["stpred"].obsm["spatial"]
    with pytest.raises(KeyError, match="obsm"):
        stpred.pp.lattice(sdata)


def test_pp_lattice_on_synthetic(sdata):
    import stpred

    stpred.pp.select_genes(sdata, n_top=4)
    stpred.pp.lattice(sdata)
    table = sdata.tables["stpred"]
    meta = table.uns["stpred"]
    for section in meta["technology"]:
        rows = (table.obs["section"] == section).to_numpy()
        grid = table.obs.loc[rows, ["array_x", "array_y"]].to_numpy()
        # synthetic spots sit on a square grid of pitch `pitch_um`; the default unit is half of it
        assert meta["lattice"]["unit_um"][section] == meta["pitch_um"][section] / 2
        np.testing.assert_array_equal(table.obsm["lattice"][rows], 2 * (grid - grid.min(0)))
