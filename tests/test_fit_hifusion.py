"""HiFusion end to end through the public API: a short fit on synthetic data must beat the training-mean baseline."""

from __future__ import annotations

import numpy as np
import pytest

import stpred
from stpred.models.hifusion import TINY_CONFIG


@pytest.fixture(scope="module")
def fitted():
    # one patient: validation comes from spatial blocks of the two training sections
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=30, seed=2, n_patients=1)
    stpred.pp.select_genes(sdata, n_top=20, sections=["S0", "S1"])
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=TINY_CONFIG["spot_size"], context_size=TINY_CONFIG["context_size"])
    predictor = stpred.tl.fit(
        sdata, "hifusion", train=["S0", "S1"], max_epochs=12, batch_size=16, progress=False, **TINY_CONFIG
    )
    stpred.tl.predict(sdata, "hifusion", sections=["S2"], progress=False)
    return sdata, predictor


def test_short_fit_beats_training_mean_on_held_out_section(fitted, against_training_mean):
    sdata, predictor = fitted
    value, baseline = against_training_mean(sdata, "stpred_hifusion", train=["S0", "S1"], test=["S2"])
    assert value["mse"] < 0.9 * baseline["mse"]
    # the baseline is constant per gene, so its per-gene PCC is undefined (every gene excluded): 0 by convention
    assert np.isnan(baseline["pcc_gene"])
    assert baseline["n_genes_excluded"] == 20
    assert value["pcc_gene"] > 0.3
    assert value["pcc_spot"] > baseline["pcc_spot"]


def test_fit_records_history_and_validation(fitted):
    sdata, predictor = fitted
    history = predictor.history
    assert len(history) == 12
    assert predictor.info["optim"]["batch_per_section"] is True  # the reference's one-section batches
    assert history["val_mse"].notna().all()
    # the restored weights are those of the best validation epoch
    assert predictor.info["best"][1]["epoch"] == int(history.loc[history["val_mse"].idxmin(), "epoch"])
    assert predictor.info["validation"]["rule"] == "spatial blocks"
    assert "S2" not in predictor.info["train_sections"]
    layer = sdata.tables["stpred"].layers["stpred_hifusion"]
    s2 = (sdata.tables["stpred"].obs["section"] == "S2").to_numpy()
    assert np.isfinite(layer[s2]).all()
    assert np.isnan(layer[~s2]).all()
