"""`tl.cross_validate` scoring: baseline beside the model, paired differences, protocol (training replaced by a stub)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stpred


class _StubPredictor:
    """Predicts the target plus noise on the requested sections; a stand-in for a trained model."""

    def __init__(self, train: list[str]) -> None:
        self.info = {"validation": "stub", "best": {"epoch": 0}, "train_sections": train}
        self.history = pd.DataFrame({"epoch": [0], "train_loss": [1.0]})

    def predict(self, sdata, sections, *, table_key="stpred", progress=False, **_):
        table = sdata.tables[table_key]
        rows = table.obs["section"].astype(str).isin(sections).to_numpy()
        target = np.asarray(table.layers["target"])[rows]
        rng = np.random.default_rng(len(sections))
        return (target + rng.normal(scale=0.5, size=target.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def _prepared():
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=8, grid=8, seed=0)
    sdata.tables["table"].obs["patient"] = "P"  # one patient, three sections: train S0, test S1, S2
    stpred.pp.select_genes(sdata, n_top=6, sections=["S0"])
    stpred.pp.normalize(sdata)
    return sdata


@pytest.fixture
def stubbed(_prepared, monkeypatch):
    import spatialdata

    calls = []

    def fake_fit(sdata, model, *, train, **kwargs):
        calls.append(list(train))
        return _StubPredictor(list(train))

    monkeypatch.setattr("stpred.tl._fit.fit_unregistered", fake_fit)
    return spatialdata.deepcopy(_prepared), calls


def test_cross_validate_reports_baseline_differences_and_protocol(stubbed):
    sdata, calls = stubbed
    res = stpred.tl.cross_validate(sdata, "hist", protocol="sample-specific", n_boot=200, progress=False)
    assert calls == [["S0"]]
    m = res.metrics
    assert set(m["key"]) == {"stpred_hist_cv", "baseline_mean"}
    assert list(dict.fromkeys(m["section"])) == ["S1", "S2", "pooled", "mean_over_sections"]
    model_rows = m[(m["key"] == "stpred_hist_cv") & m["metric"].isin(["n_genes_excluded", "frac_genes_pcc_gt_0.3"])]
    assert len(model_rows) == 2 * 4
    assert model_rows["value"].notna().all()
    base = m.query("key == 'baseline_mean' and section == 'pooled'")
    assert base.query("metric == 'n_genes_excluded'")["value"].item() == 6  # constant: every gene excluded
    diff = res.comparison()
    head = diff[diff["section"] == "mean_over_sections"].iloc[0]
    model_pcc = res.overall.query("key == 'stpred_hist_cv' and section == 'mean_over_sections' and metric == 'pcc_gene'")
    assert head["comparator"] == "baseline_mean"
    assert head["value"] == pytest.approx(model_pcc["value"].item())  # the constant baseline scores r = 0
    assert head["ci_low_genes"] < head["value"] < head["ci_high_genes"]
    assert np.isfinite(head["ci_low_sections"])
    summary = res.summary()
    row = summary.query("key == 'stpred_hist_cv' and metric == 'pcc_gene'").iloc[0]
    assert row["mean"] == pytest.approx(
        m.query("key == 'stpred_hist_cv' and section == 'mean_over_sections' and metric == 'pcc_gene'")["value"].item()
    )
    assert row["pooled"] == pytest.approx(
        m.query("key == 'stpred_hist_cv' and section == 'pooled' and metric == 'pcc_gene'")["value"].item()
    )
    assert "pcc_gene_diff" in repr(res)
    info = m.attrs["protocol"]
    assert info["genes"]["chosen_on_sections"] == ["S0"]
    assert info["genes"]["chosen_with_scored_sections"] is False
    assert info["transform"] == "log_share"
    assert info["split"]["folds"]["0"] == {"train": ["S0"], "test": ["S1", "S2"]}
    assert "pcc_gene" in info["metrics"]
    assert info["bootstrap"]["n_boot"] == 200
    stored = sdata.tables["stpred"].uns["stpred"]["cross_validation"]["stpred_hist_cv"]["protocol"]
    assert stored["transform"] == "log_share"


def test_cross_validate_constant_zero_and_checks(stubbed):
    sdata, _ = stubbed
    res = stpred.tl.cross_validate(
        sdata, "hist", protocol="sample-specific", constant="zero", n_boot=50, bootstrap_seed=1, progress=False
    )
    base = res.metrics.query("key == 'baseline_mean' and section == 'pooled'")
    assert base.query("metric == 'pcc_gene'")["value"].item() == 0.0
    assert base.query("metric == 'n_genes_excluded'")["value"].item() == 0
    with pytest.raises(ValueError, match="Unknown constant"):
        stpred.tl.cross_validate(sdata, "hist", protocol="sample-specific", constant="no", overwrite=True)
    with pytest.raises(ValueError, match="n_boot"):
        stpred.tl.cross_validate(sdata, "hist", protocol="sample-specific", n_boot=0, overwrite=True)


def test_cross_validate_fits_the_ridge_baseline_on_the_same_folds(_prepared, monkeypatch):  # noqa: PT019
    import spatialdata

    from stpred.tl import _fit

    sdata = spatialdata.deepcopy(_prepared)
    table = sdata.tables["stpred"]
    morph = np.asarray(sdata.tables["table"].obsm["morphology"], dtype=np.float32)
    table.obsm["X_emb_m"] = morph
    real_fit, calls = _fit.fit_unregistered, []

    def fake_fit(sdata, model, *, train, **kwargs):
        calls.append((model, list(train), kwargs.get("val", None)))
        if model == "ridge":
            return real_fit(sdata, model, train=train, **kwargs)
        return _StubPredictor(list(train))

    monkeypatch.setattr("stpred.tl._fit.fit_unregistered", fake_fit)
    res = stpred.tl.cross_validate(sdata, "hist", protocol="sample-specific", n_boot=50, progress=False)
    assert calls == [("hist", ["S0"], None), ("ridge", ["S0"], False)]
    assert set(res.metrics["key"]) == {"stpred_hist_cv", "baseline_mean", "baseline_ridge"}
    diffs = res.comparison().query("section == 'mean_over_sections'")
    assert set(diffs["comparator"]) == {"baseline_mean", "baseline_ridge"}
    ridge = res.overall.query("key == 'baseline_ridge' and section == 'pooled'").set_index("metric")["value"]
    assert ridge["n_genes_excluded"] == 0
    assert res.protocol["bootstrap"]["n_boot"] == 50
    only_mean = stpred.tl.cross_validate(
        sdata, "hist", protocol="sample-specific", baselines=["mean"], n_boot=50, progress=False, overwrite=True
    )
    assert set(only_mean.metrics["key"]) == {"stpred_hist_cv", "baseline_mean"}
    del table.obsm["X_emb_m"]
    with pytest.raises(KeyError, match="ridge baseline reads patch embeddings"):
        stpred.tl.cross_validate(sdata, "hist", protocol="sample-specific", baselines=["ridge"], overwrite=True)
