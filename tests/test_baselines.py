"""The built-in baselines ("mean", "ridge") go through fit / predict / save / load / evaluate like any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stpred
from stpred.models.baselines import Ridge, _affine_fits, _inner_folds, _neighbour_mean

EMB = "X_emb_test"


def _with_embedding(data, seed: int = 0):
    """Embedding = morphology (what drives expression) plus noise dimensions."""
    table = data.tables["stpred"]
    morph = np.asarray(data.tables["table"].obsm["morphology"], dtype=np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(table.n_obs, 4)).astype(np.float32)
    table.obsm[EMB] = np.concatenate([morph + 0.05 * rng.normal(size=morph.shape), noise], axis=1).astype(np.float32)
    return data


@pytest.fixture
def sdata():
    data = stpred.datasets.synthetic(n_sections=3, n_genes=12, seed=1, n_patients=3, grid=10)
    stpred.pp.select_genes(data, n_top=8, sections=["S0", "S1"])
    stpred.pp.normalize(data)
    return _with_embedding(data)


@pytest.mark.parametrize("name", ["mean", "ridge"])
def test_baseline_fits_predicts_saves_loads_and_evaluates(sdata, tmp_path, name):
    predictor = stpred.tl.fit(sdata, name, train=["S0", "S1"], embedding_key=EMB, progress=False)
    assert predictor.model.trainable is False
    stpred.tl.predict(sdata, name, progress=False)
    table = sdata.tables["stpred"]
    layer = table.layers[f"stpred_{name}"]
    assert np.isfinite(layer).all()
    predictor.save(tmp_path / name)
    loaded = stpred.tl.load(tmp_path / name)
    np.testing.assert_array_equal(loaded.predict(sdata, progress=False), layer)
    scores = stpred.tl.evaluate(sdata, f"stpred_{name}", sections=["S2"])
    mse = scores.query("metric == 'mse' and group == 'S2'")["value"].item()
    assert np.isfinite(mse)


def test_mean_predicts_the_training_mean(sdata):
    stpred.tl.fit(sdata, "mean", train=["S0"], val=False, progress=False)
    stpred.tl.predict(sdata, "mean", progress=False)
    table = sdata.tables["stpred"]
    rows = table.obs["section"].astype(str).to_numpy() == "S0"
    expected = table.layers["target"][rows].mean(0)
    np.testing.assert_allclose(table.layers["stpred_mean"], np.broadcast_to(expected, table.shape), rtol=1e-5)


def test_ridge_beats_the_mean_on_held_out_sections(sdata):
    for name in ("mean", "ridge"):
        stpred.tl.fit(sdata, name, train=["S0", "S1"], val=False, embedding_key=EMB, progress=False)
        stpred.tl.predict(sdata, name, progress=False)
    scores = stpred.tl.evaluate(sdata, "stpred_ridge", sections=["S2"], compare=["stpred_mean"], n_boot=50)
    mse = scores.query("metric == 'mse' and group == 'S2'").set_index("key")["value"]
    assert mse["stpred_ridge"] < 0.9 * mse["stpred_mean"]


def test_ridge_matches_closed_form_and_picks_alpha_on_training_rows(sdata):
    predictor = stpred.tl.fit(
        sdata, "ridge", train=["S0"], val=False, embedding_key=EMB, context="none", n_components=None,
        alphas=(0.1, 10.0, 1000.0), progress=False,
    )  # fmt: skip
    hist = predictor.history.iloc[0]
    assert hist["alpha"] in (0.1, 10.0, 1000.0)
    assert hist["inner_by_sections"] == 0.0  # one training section: spatial strips
    table = sdata.tables["stpred"]
    rows = table.obs["section"].astype(str).to_numpy() == "S0"
    x = table.obsm[EMB][rows].astype(np.float64)
    y = table.layers["target"][rows].astype(np.float64)
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    coef = np.linalg.solve(z.T @ z + hist["alpha"] * np.eye(z.shape[1]), z.T @ (y - y.mean(0)))
    expected = z @ coef + y.mean(0)
    fitted = x @ predictor.model.weight.double().numpy() + predictor.model.bias.double().numpy()
    np.testing.assert_allclose(fitted, expected, atol=1e-4)
    assert float(predictor.model.alpha) == hist["alpha"]


def test_inner_folds_group_by_section_or_strip():
    groups = [np.arange(30), np.arange(30, 50), np.arange(50, 60)]
    folds, rule = _inner_folds(groups, np.arange(60.0), 5)
    assert rule == "sections"
    assert len(folds) == 3
    assert [set(f.tolist()) for f in folds] == [set(range(30)), set(range(30, 50)), set(range(50, 60))]
    x = np.random.default_rng(0).permutation(100).astype(float)
    folds, rule = _inner_folds([np.arange(100)], x, 5)
    assert rule == "spatial strips"
    assert len(folds) == 5
    spans = sorted((x[f].min(), x[f].max()) for f in folds)
    assert all(hi < lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # contiguous, non-overlapping strips


def test_affine_fits_pca_limits_rank_and_alpha_shrinks():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 6)))
    y = torch.from_numpy(rng.normal(size=(40, 2)))
    (w_full, _), (w_big, _) = _affine_fits(x, y, [1e-6, 1e6], None)
    assert torch.linalg.matrix_rank(_affine_fits(x, y, [1.0], 2)[0][0]) <= 2
    assert w_big.abs().max() < 1e-3 < w_full.abs().max()


def test_neighbour_mean_includes_self_and_radius():
    coords = torch.tensor([[0, 0], [0, 1], [5, 5]])
    emb = torch.tensor([[1.0], [3.0], [10.0]])
    np.testing.assert_allclose(_neighbour_mean(emb, coords, 1.5).numpy().ravel(), [2.0, 2.0, 10.0])


def test_ridge_refuses_bad_options():
    with pytest.raises(ValueError, match="context"):
        Ridge(4, 3, context="ring")
    with pytest.raises(ValueError, match="alphas"):
        Ridge(4, 3, alphas=(1.0, -1.0))
    with pytest.raises(ValueError, match="inner_folds"):
        Ridge(4, 3, inner_folds=1)
