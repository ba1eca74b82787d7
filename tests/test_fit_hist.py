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
    assert "lattice" in table.obsm  # computed on demand by tl.fit
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
