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
