"""HiST through the public API: embeddings → lattice → whole-slide training; beats the training-mean baseline."""

from __future__ import annotations

import numpy as np
import pytest

import stpred

TINY = {"width": 32, "heads": 2}


@pytest.fixture(scope="module")
def fitted():
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=30, seed=2, n_patients=1)
    stpred.pp.select_genes(sdata, n_top=20, sections=["S0", "S1"])
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=64, context_size=None, progress=False)
    stpred.pp.embed(sdata, encoder="resnet18", width=8, progress=False)
    predictor = stpred.tl.fit(
        sdata, "hist", train=["S0", "S1"], embedding_key="X_emb_resnet18", max_epochs=30, lr=2e-3,
        progress=False, **TINY,
    )
    stpred.tl.predict(sdata, "hist", sections=["S2"], progress=False)
    return sdata, predictor


def test_short_fit_beats_training_mean(fitted, against_training_mean):
    sdata, predictor = fitted
    table = sdata.tables["stpred"]
    assert "lattice" not in table.obsm  # tl.fit computes the default lattice in memory and writes nothing
    value, baseline = against_training_mean(sdata, "stpred_hist", train=["S0", "S1"], test=["S2"])
    assert value["mse"] < 0.9 * baseline["mse"]
    assert value["pcc_gene"] > 0.2


def test_hist_paper_metric_from_evaluate(fitted):
    sdata, _ = fitted
    stpred.pp.normalize(sdata, method="log1p", overwrite=True)
    table = sdata.tables["stpred"]
    s2 = (table.obs["section"] == "S2").to_numpy()
    table.layers["log1p_truth_copy"] = table.layers["target"].copy()
    df = stpred.tl.evaluate(sdata, "log1p_truth_copy", sections=["S2"])
    metrics = set(df["metric"])
    assert {"hist_r2_flat", "hist_pcc_flat"} <= metrics
    # a perfect log1p prediction recovers the raw counts exactly: R² = Pearson = 1
    perfect = df.query("section == 'pooled' and metric in ['hist_r2_flat', 'hist_pcc_flat']")["value"]
    np.testing.assert_allclose(perfect.to_numpy(), 1.0, atol=1e-5)
    assert s2.any()


def test_hist_errors(fitted):
    sdata, _ = fitted
    with pytest.raises(KeyError, match="No embedding 'X_nope'"):
        stpred.tl.fit(sdata, "hist", embedding_key="X_nope")
    table = sdata.tables["stpred"]
    table.obsm["X_emb_bad"] = np.full((table.n_obs, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        stpred.tl.fit(sdata, "hist", embedding_key="X_emb_bad", max_epochs=1, **TINY)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_epochs": 1.5}, ValueError, "max_epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"plan_kwargs": {"optimizer": "sgd"}}, ValueError, "optimizer"),
        ({"plan_kwargs": {"lr": 1e-3}}, TypeError, "directly"),
        ({"plan_kwargs": {"momentum": 0.9}}, TypeError, "Unknown `plan_kwargs`"),
        ({"trainer_kwargs": {"max_epochs": 3}}, ValueError, "pass `max_epochs=`"),
        ({"val_fraction": 0.3}, TypeError, "val=<fraction>"),
        ({"val": 1.5}, ValueError, r"in \(0, 1\)"),
        ({"nan_target": True}, ValueError, "NaN or infinite values.*pp.normalize"),
    ],
)
def test_refused_fit_leaves_sdata_unchanged(fitted, kwargs, error, match):
    sdata, _ = fitted
    table = sdata.tables["stpred"]
    kwargs = dict(kwargs)
    original = table.layers["target"]
    if kwargs.pop("nan_target", False):
        target = original.copy()
        target[3, 1] = np.nan
        table.layers["target"] = target
    obsm, history, layers = sorted(table.obsm), list(table.uns["stpred"]["history"]), sorted(table.layers)
    try:
        with pytest.raises(error, match=match):
            stpred.tl.fit(sdata, "hist", train=["S0", "S1"], embedding_key="X_emb_resnet18", **TINY, **kwargs)
        assert sorted(table.obsm) == obsm
        assert "lattice" not in table.obsm
        assert list(table.uns["stpred"]["history"]) == history
        assert sorted(table.layers) == layers
    finally:
        table.layers["target"] = original
