from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from stpred import metrics as M


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    """30 spots x 12 genes; gene 3 has constant truth, gene 7 a constant prediction, spot 5 constant truth."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 12)).astype(np.float32)
    pred = (0.6 * truth + rng.normal(scale=0.8, size=truth.shape)).astype(np.float32)
    truth[:, 3] = 0.7
    pred[:, 7] = -1.0
    truth[5, :] = 0.7
    return pred, truth


def _ref_pcc_gene(pred: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    rs = []
    for g in range(truth.shape[1]):
        if np.ptp(truth[:, g]) == 0 or np.ptp(pred[:, g]) == 0:
            continue
        rs.append(pearsonr(pred[:, g].astype(np.float64), truth[:, g].astype(np.float64))[0])
    return float(np.mean(rs)), truth.shape[1] - len(rs)


def test_mse_mae_match_sklearn(pair):
    pred, truth = pair
    assert M.mse(pred, truth) == pytest.approx(mean_squared_error(truth.astype(float), pred.astype(float)), rel=1e-12)
    assert M.mae(pred, truth) == pytest.approx(mean_absolute_error(truth.astype(float), pred.astype(float)), rel=1e-12)


def test_pcc_gene_matches_scipy_and_counts_exclusions(pair):
    pred, truth = pair
    ref, n_excl = _ref_pcc_gene(pred, truth)
    assert n_excl == 2
    assert M.pcc_gene(pred, truth) == pytest.approx(ref, abs=1e-12)
    per = M.pcc_per_gene(pred, truth)
    assert per.shape == (12,)
    assert np.isnan(per[[3, 7]]).all()
    assert np.isfinite(np.delete(per, [3, 7])).all()
    assert per[0] == pytest.approx(pearsonr(pred[:, 0].astype(float), truth[:, 0].astype(float))[0], abs=1e-12)


def test_pcc_spot_matches_scipy(pair):
    pred, truth = pair
    rs = [pearsonr(pred[s].astype(float), truth[s].astype(float))[0] for s in range(30) if s != 5]
    per = M.pcc_per_spot(pred, truth)
    assert np.isnan(per[5])
    assert np.isnan(per).sum() == 1
    assert M.pcc_spot(pred, truth) == pytest.approx(np.mean(rs), abs=1e-12)


def test_flat_metrics_match_scipy_sklearn(pair):
    pred, truth = pair
    p, t = pred.astype(float).ravel(), truth.astype(float).ravel()
    assert M.pcc_flat(pred, truth) == pytest.approx(pearsonr(p, t)[0], abs=1e-12)
    assert M.r2_flat(pred, truth) == pytest.approx(r2_score(t, p), abs=1e-12)


def test_r2_gene_matches_sklearn_on_nonconstant_genes(pair):
    pred, truth = pair
    per_ref = r2_score(truth.astype(float), pred.astype(float), multioutput="raw_values")
    keep = np.ptp(truth, axis=0) > 0  # only gene 3 has constant truth; a constant prediction keeps its R²
    assert keep.sum() == 11
    per = M.r2_per_gene(pred, truth)
    np.testing.assert_allclose(per[keep], per_ref[keep], atol=1e-12)
    assert np.isnan(per[~keep]).all()
    assert M.r2_gene(pred, truth) == pytest.approx(per_ref[keep].mean(), abs=1e-12)


def test_compute_all(pair):
    pred, truth = pair
    out = M.compute_all(pred, truth)
    assert set(M.METRICS) <= set(out)
    assert out["n_genes_excluded"] == 2
    assert out["n_spots_excluded"] == 1
    assert out["n_genes_excluded_r2"] == 1
    for name in M.METRICS:
        assert out[name] == pytest.approx(getattr(M, name)(pred, truth), abs=1e-12)


def test_perfect_and_inputs_of_other_types(pair):
    _, truth = pair
    truth = truth.copy()
    truth[:, 3] += np.arange(30)  # make every gene vary
    out = M.compute_all(sp.csr_matrix(truth), truth)
    assert out["mse"] == 0.0
    assert out["pcc_gene"] == pytest.approx(1.0)
    assert out["r2_flat"] == pytest.approx(1.0)
    assert M.mse(truth[:, 0], truth[:, 0] + 1) == pytest.approx(1.0)  # 1-D accepted by flat metrics


def test_all_excluded_gives_nan_with_warning():
    truth = np.ones((5, 3))
    pred = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.warns(RuntimeWarning, match="Every gene was excluded"):
        assert np.isnan(M.pcc_gene(pred, truth))
    out = M.compute_all(pred, truth)
    assert np.isnan(out["pcc_gene"])
    assert out["n_genes_excluded"] == 3


def test_nan_rejected():
    truth = np.zeros((4, 2))
    pred = np.zeros((4, 2))
    pred[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"`pred` contains 1 NaN or infinite"):
        M.pcc_gene(pred, truth)
    truth[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"`truth` contains 1 NaN or infinite"):
        M.mse(np.zeros((4, 2)), truth)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        M.mse(np.zeros((3, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"Expected 2-D arrays"):
        M.pcc_gene(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        M.mse(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(TypeError, match="numeric array"):
        M.mse(np.array(["a", "b"]), np.zeros(2))


def test_hist_metrics():
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(40, 6)).astype(float)
    pred_log = np.log1p(counts) + rng.normal(scale=0.3, size=counts.shape)
    pred_log[0, 0] = -5.0  # expm1 < 0 -> clipped to 0 as HiST's ReLU
    back = np.maximum(np.expm1(pred_log), 0)
    groups = np.repeat(["a", "b"], 20)
    out = M.hist_metrics(pred_log, sp.csr_matrix(counts), groups=groups)
    assert out["hist_r2_flat"] == pytest.approx(r2_score(counts.ravel(), back.ravel()), abs=1e-12)
    assert out["hist_pcc_flat"] == pytest.approx(pearsonr(counts.ravel(), back.ravel())[0], abs=1e-12)
    slide = [pearsonr(counts[groups == g].ravel(), back[groups == g].ravel())[0] for g in ("a", "b")]
    assert out["hist_pcc_flat_slide_avg"] == pytest.approx(np.mean(slide), abs=1e-12)
    with pytest.raises(ValueError, match="one label per spot"):
        M.hist_metrics(pred_log, counts, groups=groups[:5])
    with pytest.raises(ValueError, match="log1p scale"):
        M.hist_metrics(np.full((2, 2), 800.0), np.ones((2, 2)))


def test_torch_versions_match_numpy(pair):
    torch = pytest.importorskip("torch")
    pred, truth = pair
    tp, tt = torch.tensor(pred, requires_grad=True), torch.tensor(truth)
    assert M.mse_torch(tp, tt).item() == pytest.approx(M.mse(pred, truth), rel=1e-12)
    assert M.mae_torch(tp, tt).item() == pytest.approx(M.mae(pred, truth), rel=1e-12)
    assert M.pcc_spot_torch(tp, tt).item() == pytest.approx(M.pcc_spot(pred, truth), abs=1e-10)
    r = M.pcc_gene_torch(tp, tt)
    assert r.item() == pytest.approx(M.pcc_gene(pred, truth), abs=1e-10)
    r.backward()
    assert torch.isfinite(tp.grad).all()
    assert tp.grad[:, 7].abs().sum() == 0  # the excluded gene gets no gradient
    with pytest.raises(ValueError, match="2-D tensors of the same shape"):
        M.pcc_gene_torch(tp[:, 0], tt[:, 0])
    assert torch.isnan(M.pcc_gene_torch(torch.ones(3, 2), torch.ones(3, 2)))


# --------------------------------------------------------------------------------------------------- constant rule
def _mostly_constant(n_spots: int = 200, n_genes: int = 250, n_good: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n_spots, n_genes))
    pred = np.tile(truth.mean(0), (n_spots, 1))  # constant on every gene ...
    pred[:, :n_good] = truth[:, :n_good] + rng.normal(scale=0.1, size=(n_spots, n_good))  # ... but 10
    return pred, truth


def test_constant_on_most_genes_is_reported_or_scored_zero():
    pred, truth = _mostly_constant()
    excl = M.compute_all(pred, truth)
    assert excl["pcc_gene"] > 0.95
    assert excl["n_genes_excluded"] == 240
    assert excl["n_genes_constant"] == 240
    zero = M.compute_all(pred, truth, constant="zero")
    assert zero["pcc_gene"] == pytest.approx(excl["pcc_gene"] * 10 / 250)
    assert zero["pcc_gene"] < 0.05
    assert zero["n_genes_excluded"] == 0
    assert zero["n_genes_constant"] == 240
    assert excl["frac_genes_pcc_gt_0.3"] == zero["frac_genes_pcc_gt_0.3"] == pytest.approx(10 / 250)
    assert M.pcc_gene(pred, truth, constant="zero") == pytest.approx(zero["pcc_gene"])
    with pytest.raises(ValueError, match="'exclude' or 'zero'"):
        M.pcc_gene(pred, truth, constant="drop")


def test_near_constant_prediction_counts_as_constant_scale_aware():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(100, 3))
    pred = np.empty_like(truth)
    pred[:, 0] = 5.0 + 1e-7 * rng.normal(size=100)  # float noise on a level of 5: constant
    pred[:, 1] = 1e-3 * truth[:, 1]  # shrunk but a real signal: kept
    pred[:, 2] = truth[:, 2]
    per = M.pcc_per_gene(pred, truth)
    assert np.isnan(per[0])
    assert per[1] == pytest.approx(1.0)
    for scale in (1e-4, 1e4):  # the same genes are flagged whatever the unit
        assert np.isnan(M.pcc_per_gene(pred * scale, truth * scale)).tolist() == [True, False, False]
    assert M.pcc_per_gene(pred, truth, constant="zero")[0] == 0.0
    truth[:, 2] = 1.0  # constant truth stays excluded under "zero"
    assert np.isnan(M.pcc_per_gene(pred, truth, constant="zero")[2])


def test_torch_uses_same_constant_rule():
    torch = pytest.importorskip("torch")
    pred, truth = _mostly_constant(n_spots=50, n_genes=20, n_good=5)
    pred[:, 5] += 1e-9 * np.arange(50)  # near-constant, not exactly
    got = M.pcc_gene_torch(torch.tensor(pred), torch.tensor(truth)).item()
    assert got == pytest.approx(M.pcc_gene(pred, truth), abs=1e-10)
    assert M.compute_all(pred, truth)["n_genes_excluded"] == 15


# --------------------------------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_covers_known_difference_and_shrinks():
    rng = np.random.default_rng(0)
    true_diff = 0.05
    small = rng.normal(true_diff, 0.1, size=(4, 50))
    large = rng.normal(true_diff, 0.1, size=(4, 2000))
    a = M.paired_bootstrap(small, over="genes", n_boot=1000, seed=1)
    b = M.paired_bootstrap(large, over="genes", n_boot=1000, seed=1)
    assert a["ci_low"] < true_diff < a["ci_high"]
    assert b["ci_low"] < true_diff < b["ci_high"]
    assert (b["ci_high"] - b["ci_low"]) < 0.4 * (a["ci_high"] - a["ci_low"])
    assert a["estimate"] == pytest.approx(small.mean())
    # coverage over many synthetic data sets is close to the nominal 95 %
    hits = 0
    for i in range(100):
        d = np.random.default_rng(100 + i).normal(true_diff, 0.2, size=(1, 80))
        out = M.paired_bootstrap(d, n_boot=300, seed=i)
        hits += out["ci_low"] < true_diff < out["ci_high"]
    assert 85 <= hits <= 100


def test_paired_bootstrap_sections_nan_and_determinism():
    rng = np.random.default_rng(2)
    d = rng.normal(0.1, 0.05, size=(6, 100)) + rng.normal(0, 0.05, size=(6, 1))  # section effects
    d[0, :10] = np.nan  # genes with constant truth in one section
    one = M.paired_bootstrap(d, over="sections", n_boot=500, seed=7)
    assert one == M.paired_bootstrap(d, over="sections", n_boot=500, seed=7)
    assert one != M.paired_bootstrap(d, over="sections", n_boot=500, seed=8)
    assert one["n_sections"] == 6
    assert one["ci_low"] < one["estimate"] < one["ci_high"]
    means = [np.nanmean(row) for row in d]
    assert one["estimate"] == pytest.approx(np.mean(means))
    single = M.paired_bootstrap(d[:1], over="sections")
    assert np.isnan(single["ci_low"])
    assert np.isnan(single["ci_high"])
    with pytest.raises(ValueError, match="n_boot"):
        M.paired_bootstrap(d, n_boot=0)
    with pytest.raises(ValueError, match="`over`"):
        M.paired_bootstrap(d, over="spots")


def test_compare_pcc_gene_rows():
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(90, 60))
    groups = np.repeat(["S1", "S2", "S3"], 30)
    model = truth + rng.normal(size=truth.shape)
    mean = np.tile(truth.mean(0), (90, 1))  # a constant baseline scores r = 0 in the comparison
    rows = M.compare_pcc_gene(model, mean, truth, groups=groups, n_boot=300, seed=0)
    assert [r["group"] for r in rows] == ["S1", "S2", "S3", "mean_over_sections", "pooled"]
    s1 = rows[0]
    ref = M.pcc_gene(model[:30], truth[:30])
    assert s1["difference"] == pytest.approx(ref)
    assert s1["pcc_gene"] == pytest.approx(ref)
    assert s1["pcc_gene_other"] == 0.0
    assert np.isnan(s1["ci_low_sections"])
    headline = rows[3]
    assert headline["difference"] == pytest.approx(np.mean([r["difference"] for r in rows[:3]]))
    assert headline["ci_low_genes"] < headline["difference"] < headline["ci_high_genes"]
    assert headline["ci_low_sections"] <= headline["difference"] <= headline["ci_high_sections"]
    assert rows[4]["difference"] == pytest.approx(M.pcc_gene(model, truth))
    with pytest.raises(ValueError, match="same shape"):
        M.compare_pcc_gene(model, mean[:, :5], truth)


# --------------------------------------------------------------------------------------------------- calibration
def test_calibration_matches_a_gaussian_model():
    rng = np.random.default_rng(0)
    n, g = 4000, 5
    std = rng.uniform(0.1, 2.0, size=(n, g))
    truth = rng.normal(size=(n, g))
    pred = truth + rng.normal(size=(n, g)) * std  # errors really have this std
    out = M.calibration(pred, truth, std)
    assert abs(out["coverage"] - 0.95) < 0.01
    assert abs(out["nominal"] - 0.95) < 1e-3
    assert out["spearman_std_abs_error"] > 0.3
    assert out["n_genes_excluded"] == 0
    # a std unrelated to the error ranks nothing; a too-small std covers little
    shuffled = M.calibration(pred, truth, rng.permutation(std.ravel()).reshape(n, g))
    assert abs(shuffled["spearman_std_abs_error"]) < 0.1
    assert M.calibration(pred, truth, std / 4)["coverage"] < 0.5


def test_calibration_ties_constant_genes_and_bad_input():
    pred = np.array([[0.0, 1.0], [1.0, 1.0], [3.0, 1.0], [6.0, 1.0]])
    truth = np.zeros((4, 2))
    std = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])  # gene 1: constant std -> excluded
    out = M.calibration(pred, truth, std, z=1.0)
    assert out["n_genes_excluded"] == 1
    assert np.isnan(out["spearman_per_gene"][1])
    # ranks with ties averaged: std ranks (1.5, 1.5, 3, 4), error ranks (1, 2, 3, 4)
    r = np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    assert out["spearman_std_abs_error"] == pytest.approx(r)
    assert out["coverage"] == pytest.approx(6 / 8)  # gene 0: |0|<=1, |1|<=1, 3>2, 6>3; gene 1: all covered
    with pytest.raises(ValueError, match="negative"):
        M.calibration(pred, truth, -std)
    with pytest.raises(ValueError, match="same shape"):
        M.calibration(pred, truth, std[:, :1])
    with pytest.raises(ValueError, match="`z`"):
        M.calibration(pred, truth, std, z=0)
