"""The automatic spatial validation split works for every seed on small sections with few distinct x positions."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stpred.tl._splits import validation_split


def _section(n_columns: int, n_spots: int = 29, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    grid = np.array([(x, y) for x in range(n_columns) for y in range(30)], dtype=float) * 100
    xy = grid[rng.choice(len(grid), n_spots, replace=False)]
    obs = pd.DataFrame({"section": ["S0"] * n_spots, "patient": ["P"] * n_spots}, index=[f"s{i}" for i in range(n_spots)])
    table = ad.AnnData(np.zeros((n_spots, 2), dtype=np.float32), obs=obs)
    table.obsm["spatial"] = xy
    return table


@pytest.mark.parametrize("n_columns", [3, 4, 5, 10])
def test_spatial_block_split_works_for_every_seed(n_columns):
    # 29 spots on few grid columns (value quantiles coincide): scattered blocks, one in each of 5 equal-count columns
    table = _section(n_columns)
    xy = table.obsm["spatial"]
    column = np.empty(29, int)
    column[np.lexsort((xy[:, 1], xy[:, 0]))] = np.arange(29) * 5 // 29
    for seed in range(21):
        train, val, info = validation_split(table, ["S0"], seed=seed)
        assert info["rule"] == "spatial blocks"
        assert "strips_fallback" not in info
        tr, va = train["S0"], val["S0"]
        assert 5 <= len(va) <= 10, (seed, len(va))  # one block of 1-2 spots in each of the 5 columns
        assert set(column[va]) == set(range(5))
        assert len(np.intersect1d(tr, va)) == 0
        assert sorted(np.concatenate([tr, va])) == list(range(29))


@pytest.mark.parametrize("n_spots", [2, 3, 7, 12])
def test_small_sections_fall_back_to_strips_never_empty(n_spots):
    table = _section(3, n_spots=n_spots)
    x = table.obsm["spatial"][:, 0]
    for seed in range(21):
        train, val, info = validation_split(table, ["S0"], seed=seed)
        tr, va = train["S0"], val["S0"]
        assert len(tr), (n_spots, seed)
        assert len(va), (n_spots, seed)
        assert sorted(np.concatenate([tr, va])) == list(range(n_spots))
        if info.get("strips_fallback"):
            # a strip along x: no training spot lies strictly inside the validation strip's x range
            assert not ((x[tr] > x[va].min()) & (x[tr] < x[va].max())).any()


def test_spatial_block_split_says_what_it_needs():
    with pytest.raises(ValueError, match=r"Section 'S0' has 1 spot\(s\); a spatial validation block needs at least 2"):
        validation_split(_section(3, n_spots=1), ["S0"])
    two = validation_split(_section(3, n_spots=2), ["S0"], seed=1)
    assert len(two[0]["S0"]) == 1
    assert len(two[1]["S0"]) == 1
    table = _section(3)
    del table.obsm["spatial"]
    with pytest.raises(KeyError, match=r"needs spot coordinates in `obsm\['spatial'\]`.*`val=False`"):
        validation_split(table, ["S0"])
