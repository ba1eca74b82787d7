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
    # 29 spots on 3-4 grid columns: value quantiles coincide, and the previous rule found an empty strip for seed 1
    table = _section(n_columns)
    x = table.obsm["spatial"][:, 0]
    for seed in range(21):
        train, val, info = validation_split(table, ["S0"], seed=seed)
        assert info["rule"] == "spatial blocks"
        tr, va = train["S0"], val["S0"]
        assert 4 <= len(va) <= 7, (seed, len(va))  # about 1/5 of the spots: one block in each of 5 columns
        assert len(np.intersect1d(tr, va)) == 0
        assert sorted(np.concatenate([tr, va])) == list(range(29))
        # scattered over the section: validation spots in more than one x position
        assert len(np.unique(x[va])) >= min(2, n_columns)


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
