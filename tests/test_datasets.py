from __future__ import annotations

import numpy as np
import pytest

import stpred


def _image(sdata, section: str) -> np.ndarray:
    return sdata.images[f"{section}_hne"]["scale0"]["image"].values


# ---------------------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------------------
def test_synthetic_contract_and_sizes(sdata, assert_contract):
    assert_contract(sdata)
    table = sdata.tables["table"]
    assert list(table.obs["section"].cat.categories) == ["S0", "S1"]
    assert list(table.obs["patient"].cat.categories) == ["P0", "P1"]
    assert table.var_names.tolist() == [f"G{g:03d}" for g in range(8)]
    counts = table.obs["section"].value_counts()
    assert ((counts >= 100) & (counts <= 200)).all(), counts
    for section in ("S0", "S1"):
        assert max(_image(sdata, section).shape) <= 2000
        assert table.uns["stpred"]["technology"][section] == "synthetic"
        assert table.uns["stpred"]["pitch_um"][section] == pytest.approx(160.0)
        assert sdata.shapes[f"{section}_spots"]["radius"].iloc[0] == pytest.approx(40.0)
    x = table.X.toarray()
    assert (x == np.round(x)).all()
    assert (x >= 0).all()
    # the spots lie on the lattice described by array_x / array_y
    np.testing.assert_allclose(table.obsm["spatial"], (table.obs[["array_x", "array_y"]].to_numpy() + 0.5) * 160)
    # library size varies per spot, and the "constant" genes vary less than the others
    totals = x.sum(axis=1)
    assert totals.std() / totals.mean() > 0.2


def test_synthetic_defaults():
    sdata = stpred.datasets.synthetic()
    table = sdata.tables["table"]
    assert table.shape[1] == 50
    scale0 = sdata.images["S0_hne"]["scale0"]["image"]
    assert scale0.data.chunksize == (3, 1024, 1024)
    assert list(table.obs["section"].cat.categories) == ["S0", "S1", "S2"]
    programme = table.var["programme"]
    x = table.X.toarray()
    share = x / x.sum(axis=1, keepdims=True)
    cv = share.std(axis=0) / share.mean(axis=0)
    assert cv[(programme == "constant").to_numpy()].max() < cv[(programme == "tumour").to_numpy()].min()


def test_synthetic_is_seeded(sdata):
    one = stpred.datasets.synthetic(n_sections=1, n_genes=8, seed=0)
    # section 0 does not depend on how many sections are generated
    a, b = one.tables["table"], sdata.tables["table"]
    rows = (b.obs["section"] == "S0").to_numpy()
    np.testing.assert_array_equal(a.X.toarray(), b.X[rows].toarray())
    np.testing.assert_array_equal(_image(one, "S0"), _image(sdata, "S0"))
    other = stpred.datasets.synthetic(n_sections=1, n_genes=8, seed=1, grid=6, pitch=64)
    again = stpred.datasets.synthetic(n_sections=1, n_genes=8, seed=1, grid=6, pitch=64)
    np.testing.assert_array_equal(other.tables["table"].X.toarray(), again.tables["table"].X.toarray())
    np.testing.assert_array_equal(_image(other, "S0"), _image(again, "S0"))
    small = stpred.datasets.synthetic(n_sections=1, n_genes=8, seed=0, grid=6, pitch=64)
    assert not np.array_equal(_image(small, "S0"), _image(other, "S0"))


def test_synthetic_patients(assert_contract):
    sdata = stpred.datasets.synthetic(n_sections=4, n_genes=5, n_patients=2, grid=6, pitch=64)
    assert_contract(sdata)
    obs = sdata.tables["table"].obs
    mapping = obs.groupby("section", observed=True)["patient"].first().astype(str).to_dict()
    assert mapping == {"S0": "P0", "S1": "P0", "S2": "P1", "S3": "P1"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_sections": 2, "n_patients": 3}, ValueError, r"`n_patients` <= `n_sections` \(2\), found 3"),
        ({"n_patients": 0}, ValueError, "Expected `n_patients` to be positive"),
        ({"pitch": 60}, ValueError, "multiple of 8"),
        ({"n_genes": 2.5}, TypeError, "`n_genes` to be an integer, found float"),
        ({"n_sections": 0}, ValueError, "Expected `n_sections` to be positive, found 0"),
        ({"mpp": -1.0}, ValueError, "Expected `mpp` to be positive"),
    ],
)
def test_synthetic_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        stpred.datasets.synthetic(**kwargs)


def _pixel_features(image: np.ndarray, xy: np.ndarray, half: int) -> np.ndarray:
    """Simple colour statistics of the square window around each spot (independent of the generator)."""
    feats = []
    for x, y in np.floor(xy).astype(int):
        win = image[:, y - half : y + half, x - half : x + half].reshape(3, -1).astype(np.float64)
        grey = win.mean(axis=0)
        feats.append(
            [
                *win.mean(axis=1),
                *win.std(axis=1),
                (grey < 90).mean(),
                (grey < 140).mean(),
                ((win[0] - win[1]) > 80).mean(),
            ]
        )
    return np.asarray(feats)


def test_synthetic_expression_is_learnable_from_pixels(sdata):
    from sklearn.linear_model import RidgeCV

    table = sdata.tables["table"]
    x = table.X.toarray()
    y = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e2)
    feats, targets = {}, {}
    for section in ("S0", "S1"):
        rows = (table.obs["section"] == section).to_numpy()
        feats[section] = _pixel_features(_image(sdata, section), table.obsm["spatial"][rows], half=56)
        targets[section] = y[rows]
    mu, sd = feats["S0"].mean(0), feats["S0"].std(0) + 1e-8

    def test_pcc(train_y: np.ndarray) -> np.ndarray:
        model = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit((feats["S0"] - mu) / sd, train_y)
        pred = model.predict((feats["S1"] - mu) / sd)
        truth = targets["S1"]
        return np.array([np.corrcoef(pred[:, g], truth[:, g])[0, 1] for g in range(truth.shape[1])])

    programme = table.var["programme"].astype(str).to_numpy()
    morph = np.isin(programme, ["tumour", "stroma", "immune"])
    real = test_pcc(targets["S0"])
    shuffled = test_pcc(np.random.default_rng(0).permutation(targets["S0"]))
    assert np.nanmean(real[morph]) > 0.5, real
    assert np.nanmean(real[morph]) > np.nanmean(shuffled[morph]) + 0.3, (real, shuffled)
