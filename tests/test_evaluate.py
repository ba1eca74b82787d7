"""`tl.evaluate` on hand-made layers: constant rule, NaN policy, comparisons, protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import stpred
from stpred import metrics


def _table(n_per: int = 40, n_genes: int = 30, seed: int = 0) -> AnnData:
    rng = np.random.default_rng(seed)
    sections = np.repeat(["S0", "S1", "S2"], n_per)
    target = rng.normal(size=(3 * n_per, n_genes)) + np.repeat(rng.normal(size=(3, n_genes)), n_per, axis=0)
    obs = pd.DataFrame({"section": pd.Categorical(sections)}, index=[f"s{i}" for i in range(3 * n_per)])
    table = AnnData(X=np.abs(target).astype(np.float32), obs=obs)
    table.var_names = [f"g{i}" for i in range(n_genes)]
    table.layers["target"] = target.astype(np.float32)
    good = target + rng.normal(scale=1.0, size=target.shape)
    good[sections == "S0"] = np.nan  # S0 not predicted (as tl.predict leaves it)
    table.layers["stpred_m"] = good.astype(np.float32)
    train = sections == "S0"
    table.layers["baseline_mean"] = np.broadcast_to(target[train].mean(0), target.shape).astype(np.float32)
    table.uns["stpred"] = {
        "gene_selection": {"flavor": "mean", "n_top": n_genes, "sections": ["S0"]},
        "normalize": {"method": "log_share"},
        "predictions": {"stpred_m": {"train_sections": ["S0"]}},
    }
    return table


def _value(df: pd.DataFrame, key: str, group: str, metric: str) -> float:
    return df.query("key == @key and group == @group and metric == @metric")["value"].item()


def test_groups_headline_and_new_metrics():
    table = _table()
    df = stpred.tl.evaluate(table, "stpred_m")
    assert list(dict.fromkeys(df["section"])) == ["S1", "S2", "pooled", "mean_over_sections"]
    s1 = (table.obs["section"] == "S1").to_numpy()
    pred, true = table.layers["stpred_m"], table.layers["target"]
    assert _value(df, "stpred_m", "S1", "pcc_gene") == pytest.approx(metrics.pcc_gene(pred[s1], true[s1]))
    mean = np.mean([_value(df, "stpred_m", s, "pcc_gene") for s in ("S1", "S2")])
    assert _value(df, "stpred_m", "mean_over_sections", "pcc_gene") == pytest.approx(mean)
    assert _value(df, "stpred_m", "pooled", "n_genes_excluded") == 0
    assert 0 < _value(df, "stpred_m", "S1", "frac_genes_pcc_gt_0.3") <= 1
    assert (df["n_spots_nan"] == 0).all()


def test_constant_on_240_of_250_genes():
    table = _table(n_genes=250)
    pred = table.layers["baseline_mean"].copy()  # constant on every gene ...
    pred[:, :10] = table.layers["target"][:, :10]  # ... except 10 perfect ones
    table.layers["stpred_c"] = pred
    with pytest.warns(RuntimeWarning, match="constant prediction for 240 gene"):
        excl = stpred.tl.evaluate(table, "stpred_c")
    assert _value(excl, "stpred_c", "mean_over_sections", "pcc_gene") > 0.95
    assert _value(excl, "stpred_c", "pooled", "n_genes_excluded") == 240
    assert _value(excl, "stpred_c", "S1", "n_genes_excluded") == 240
    zero = stpred.tl.evaluate(table, "stpred_c", constant="zero")
    assert _value(zero, "stpred_c", "mean_over_sections", "pcc_gene") < 0.05
    assert _value(zero, "stpred_c", "pooled", "n_genes_excluded") == 0
    assert _value(zero, "stpred_c", "pooled", "frac_genes_pcc_gt_0.3") == pytest.approx(10 / 250)
    with pytest.raises(ValueError, match="Unknown constant"):
        stpred.tl.evaluate(table, "stpred_c", constant="drop")


def test_nan_rows_refused_or_reported():
    table = _table()
    pred = table.layers["stpred_m"].copy()
    sec = table.obs["section"].to_numpy()
    rows = np.flatnonzero(sec == "S2")[:3]
    pred[rows[0], 4] = np.nan  # partial NaN rows
    pred[rows[1:], :] = np.nan  # whole rows inside a predicted section
    table.layers["stpred_m"] = pred
    before = dict(table.uns["stpred"])
    with pytest.raises(ValueError, match=r"3 spot\(s\) .* \(S2: 3\).*nan='drop'"):
        stpred.tl.evaluate(table, "stpred_m")
    assert "evaluations" not in table.uns["stpred"]  # a failed call leaves the table as it was
    assert dict(table.uns["stpred"]) == before
    df = stpred.tl.evaluate(table, "stpred_m", nan="drop")
    s2 = df.query("section == 'S2' and metric == 'mse'")
    assert s2["n_spots_nan"].item() == 3
    assert s2["n_spots"].item() == 37
    assert df.query("section == 'S1'")["n_spots_nan"].eq(0).all()
    assert df.query("section == 'pooled'")["n_spots_nan"].eq(3).all()
    assert df.attrs["protocol"]["n_spots_nan"] == 3
    keep = (sec == "S2") & np.isfinite(pred).all(axis=1)
    assert _value(df, "stpred_m", "S2", "mse") == pytest.approx(
        metrics.mse(pred[keep], table.layers["target"][keep]), rel=1e-6
    )
    with pytest.raises(ValueError, match="no predictions for section"):
        stpred.tl.evaluate(table, "stpred_m", sections=["S0", "S1"])


def test_compare_pairs_layers_on_the_same_spots():
    table = _table()
    df = stpred.tl.evaluate(table, "stpred_m", compare=["baseline_mean"], n_boot=200, seed=3)
    assert set(df["key"]) == {"stpred_m", "baseline_mean"}
    assert df.query("key == 'baseline_mean' and metric == 'mse'")["n_spots"].tolist() == [40, 40, 80, 80]
    diff = df.query("metric == 'pcc_gene_diff'")
    assert list(diff["group"]) == ["S1", "S2", "mean_over_sections", "pooled"]
    assert set(diff["comparator"]) == {"baseline_mean"}
    head = diff.query("group == 'mean_over_sections'").iloc[0]
    # the baseline is constant: it scores r = 0 in the comparison, so the difference is the model's PCC
    assert head["value"] == pytest.approx(_value(df, "stpred_m", "mean_over_sections", "pcc_gene"))
    assert head["ci_low_genes"] < head["value"] < head["ci_high_genes"]
    assert head["ci_low_sections"] <= head["value"] <= head["ci_high_sections"]
    assert np.isnan(diff.query("group == 'S1'")["ci_low_sections"].item())
    again = stpred.tl.evaluate(table, "stpred_m", compare="baseline_mean", n_boot=200, seed=3)
    pd.testing.assert_frame_equal(df, again)
    with pytest.raises(ValueError, match="other layers"):
        stpred.tl.evaluate(table, "stpred_m", compare=["stpred_m"])
    with pytest.raises(KeyError, match="No layer 'nope'"):
        stpred.tl.evaluate(table, "stpred_m", compare=["nope"])


def test_protocol_in_attrs_and_uns():
    table = _table()
    df = stpred.tl.evaluate(table, "stpred_m", compare=["baseline_mean"], n_boot=50)
    info = df.attrs["protocol"]
    assert info["genes"]["chosen_on_sections"] == ["S0"]
    assert info["genes"]["chosen_with_scored_sections"] is False
    assert info["transform"] == "log_share"
    assert info["split"] == {"train_sections": ["S0"], "scored_sections": ["S1", "S2"], "scored_training_sections": []}
    assert {"pcc_gene", "frac_genes_pcc_gt_0.3", "pcc_gene_diff", "n_genes_excluded"} <= set(info["metrics"])
    assert "headline" in info
    assert info["bootstrap"]["n_boot"] == 50
    stored = table.uns["stpred"]["evaluations"]["stpred_m"]
    assert stored["split"]["scored_sections"] == ["S1", "S2"]
    assert stored["compared_with"] == ["baseline_mean"]


def test_other_groupings():
    table = _table()
    pooled_only = stpred.tl.evaluate(table, "stpred_m", groupby=None, compare="baseline_mean", n_boot=50)
    assert set(pooled_only["group"]) == {"pooled"}
    assert pooled_only.query("metric == 'pcc_gene_diff'")["value"].item() == pytest.approx(
        _value(pooled_only, "stpred_m", "pooled", "pcc_gene")
    )
    table.obs["half"] = np.where(np.arange(table.n_obs) % 2 == 0, "even", "odd")
    by_half = stpred.tl.evaluate(table, "stpred_m", groupby="half")
    assert list(dict.fromkeys(by_half["half"])) == ["even", "odd", "pooled", "mean_over_half"]
    with pytest.raises(KeyError, match="No column 'nope'"):
        stpred.tl.evaluate(table, "stpred_m", groupby="nope")
