"""Tests of ``stpred.pp.select_genes`` and ``stpred.pp.normalize`` against hand computations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import stpred

if TYPE_CHECKING:
    from spatialdata import SpatialData


@pytest.fixture(scope="module")
def _tiny_once() -> SpatialData:
    # 2 sections of a 6×6 lattice on 192 px images: gene selection needs no pixels
    return stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32, seed=0)


@pytest.fixture
def tiny(_tiny_once: SpatialData) -> SpatialData:
    import spatialdata

    return spatialdata.deepcopy(_tiny_once)


def _counts_frame(sdata: SpatialData) -> pd.DataFrame:
    raw = sdata.tables["table"]
    df = pd.DataFrame(raw.X.toarray().astype(np.float64), index=raw.obs_names, columns=raw.var_names)
    df["section"] = raw.obs["section"].astype(str).to_numpy()
    return df


def _expected_mean_genes(df: pd.DataFrame, sections: list[str], n_top: int, exclude: tuple[str, ...] = ()) -> list[str]:
    per_section = df[df["section"].isin(sections)].groupby("section").mean()
    score = per_section.mean(axis=0).drop(list(exclude))
    ranked = sorted(score.index, key=lambda g: (-score[g], g))
    return ranked[:n_top]


def _set_counts(sdata: SpatialData, counts: np.ndarray, genes: list[str] | None = None) -> None:
    raw = sdata.tables["table"]
    raw.X = sparse.csr_matrix(counts.astype(np.float32))
    if genes is not None:
        raw.var_names = pd.Index(genes)


# ------------------------------------------------------------------------------------------------------------------
# select_genes


def test_mean_matches_hand_computation(tiny: SpatialData) -> None:
    df = _counts_frame(tiny)
    stpred.pp.select_genes(tiny, n_top=5)
    out = tiny.tables["stpred"]
    expected = _expected_mean_genes(df, ["S0", "S1"], 5)
    assert list(out.var_names) == expected
    assert out.uns["stpred"]["genes"] == expected
    assert out.X.dtype == np.float32
    assert isinstance(out.X, np.ndarray)
    np.testing.assert_array_equal(out.X, df.loc[out.obs_names, expected].to_numpy(np.float32))


def test_mean_is_average_of_section_means_not_pooled_mean(tiny: SpatialData) -> None:
    # gene A is 100 in the larger section only, gene B 101 in the smaller section only: the pooled mean over spots
    # prefers A, the average of the per-section means prefers B
    raw = tiny.tables["table"]
    sec = raw.obs["section"].astype(str).to_numpy()
    sizes = pd.Series(sec).value_counts()
    big, small = sizes.index[0], sizes.index[-1]
    assert sizes[big] > sizes[small]
    counts = np.zeros((raw.n_obs, raw.n_vars))
    counts[sec == big, 0] = 100  # gene A
    counts[sec == small, 1] = 101  # gene B
    counts[:, 2:] = 1
    _set_counts(tiny, counts)
    assert counts[:, 0].mean() > counts[:, 1].mean()  # pooled: A first
    stpred.pp.select_genes(tiny, n_top=2)
    assert list(tiny.tables["stpred"].var_names) == [raw.var_names[1], raw.var_names[0]]


def test_ties_broken_by_gene_name(tiny: SpatialData) -> None:
    raw = tiny.tables["table"]
    genes = ["ZETA", "BETA", "OMEGA", "ALPHA", "GAMMA", "KAPPA", "DELTA", "EPSILON"]
    _set_counts(tiny, np.full((raw.n_obs, raw.n_vars), 3.0), genes)
    stpred.pp.select_genes(tiny, n_top=4)
    assert list(tiny.tables["stpred"].var_names) == ["ALPHA", "BETA", "DELTA", "EPSILON"]


def test_training_sections_only(tiny: SpatialData) -> None:
    df = _counts_frame(tiny)
    stpred.pp.select_genes(tiny, n_top=4, sections=["S1"])
    out = tiny.tables["stpred"]
    assert list(out.var_names) == _expected_mean_genes(df, ["S1"], 4)
    sel = out.uns["stpred"]["gene_selection"]
    assert sel == {"flavor": "mean", "n_top": 4, "sections": ["S1"], "test_sections_included": False}
    # every spot of every section stays in the table
    assert list(out.obs_names) == list(tiny.tables["table"].obs_names)


def test_only_genes_present_in_every_section(tiny: SpatialData) -> None:
    df = _counts_frame(tiny)
    top = _expected_mean_genes(df, ["S0", "S1"], 1)[0]
    tiny.tables["table"].var.loc[top, "present_S1"] = False
    stpred.pp.select_genes(tiny, n_top=3)
    assert top not in tiny.tables["stpred"].var_names
    assert list(tiny.tables["stpred"].var_names) == _expected_mean_genes(df, ["S0", "S1"], 3, exclude=(top,))
    with pytest.raises(ValueError, match=r"larger than the number of genes present in all sections \(7\)"):
        stpred.pp.select_genes(tiny, n_top=8, overwrite=True)


def test_stpred_table_follows_contract(tiny: SpatialData) -> None:
    from spatialdata.models import get_table_keys

    raw = tiny.tables["table"]
    stpred.pp.select_genes(tiny, n_top=3)
    out = tiny.tables["stpred"]
    pd.testing.assert_frame_equal(out.obs, raw.obs)
    assert out.obs is not raw.obs
    np.testing.assert_array_equal(out.obsm["spatial"], raw.obsm["spatial"])
    assert get_table_keys(out) == get_table_keys(raw)
    for key in ("mpp", "spot_diameter_um", "pitch_um", "technology"):
        assert out.uns["stpred"][key] == raw.uns["stpred"][key]
    assert "genes" not in raw.uns["stpred"]  # a copy, not the same dict
    history = out.uns["stpred"]["history"]
    (last,) = [v for k, v in history.items() if k.endswith("select_genes")]
    assert last["params"]["n_top"] == 3


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")  # zarr 3 notice on anndata's write
def test_uns_survives_zarr_round_trip(tiny: SpatialData, tmp_path) -> None:
    import anndata as ad

    stpred.pp.select_genes(tiny, n_top=3)
    stpred.pp.normalize(tiny)
    with ad.settings.override(zarr_write_format=3):
        tiny.tables["stpred"].write_zarr(tmp_path / "t.zarr")
    back = ad.read_zarr(tmp_path / "t.zarr")
    assert list(back.uns["stpred"]["genes"]) == list(tiny.tables["stpred"].var_names)
    assert back.uns["stpred"]["gene_selection"]["test_sections_included"]
    assert back.uns["stpred"]["normalize"] == {"method": "log_share"}


def test_hvg_flavor(tiny: SpatialData) -> None:
    import anndata as ad
    import scanpy as sc

    stpred.pp.select_genes(tiny, n_top=3, flavor="hvg")
    out = tiny.tables["stpred"]
    sel = out.uns["stpred"]["gene_selection"]
    assert sel["flavor"] == "hvg"
    # independent scanpy call on a plain AnnData with the same recipe
    raw = tiny.tables["table"]
    a = ad.AnnData(X=raw.X.copy(), obs=pd.DataFrame({"section": raw.obs["section"].astype(str)}, index=raw.obs_names))
    a.obs["section"] = a.obs["section"].astype("category")
    a.var_names = raw.var_names
    if sel["hvg_flavor"] == "seurat_v3":
        df = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=3, batch_key="section", inplace=False)
    else:
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        df = sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=3, batch_key="section", inplace=False)
    df.index = raw.var_names
    assert set(out.var_names) == set(df.index[df["highly_variable"]])


def test_select_genes_errors(tiny: SpatialData) -> None:
    with pytest.raises(ValueError, match=r"Unknown section\(s\) \['S9'\]"):
        stpred.pp.select_genes(tiny, sections=["S9"], n_top=2)
    with pytest.raises(ValueError, match=r"`n_top=9` is larger than .* all sections \(8\)"):
        stpred.pp.select_genes(tiny, n_top=9)
    with pytest.raises(ValueError, match="Expected `n_top` to be positive, found 0"):
        stpred.pp.select_genes(tiny, n_top=0)
    with pytest.raises(TypeError, match="Expected `n_top` to be an int, found float"):
        stpred.pp.select_genes(tiny, n_top=2.0)
    with pytest.raises(ValueError, match="Unknown flavor 'seurat'"):
        stpred.pp.select_genes(tiny, n_top=2, flavor="seurat")
    with pytest.raises(KeyError, match=r"No table 'counts' in `sdata.tables`; found \['table'\]"):
        stpred.pp.select_genes(tiny, n_top=2, table_key="counts")
    with pytest.raises(ValueError, match=r"The AnnData has no `uns\['spatial'\]\[library\]` entry"):
        stpred.pp.select_genes(tiny.tables["table"], n_top=2)  # an AnnData without scanpy's Visium images
    with pytest.raises(TypeError, match="Expected a SpatialData object"):
        stpred.pp.select_genes(tiny.tables["table"].X, n_top=2)
    stpred.pp.select_genes(tiny, n_top=2)
    with pytest.raises(ValueError, match=r"Table 'stpred' already exists; pass `overwrite=True`"):
        stpred.pp.select_genes(tiny, n_top=3)
    stpred.pp.select_genes(tiny, n_top=3, overwrite=True)
    assert tiny.tables["stpred"].n_vars == 3


@pytest.mark.parametrize(("value", "match"), [(np.nan, "contain NaN"), (-1.0, "contain negative values")])
def test_select_genes_rejects_bad_counts(tiny: SpatialData, value: float, match: str) -> None:
    raw = tiny.tables["table"]
    counts = raw.X.toarray()
    counts[0, 0] = value
    _set_counts(tiny, counts)
    with pytest.raises(ValueError, match=match):
        stpred.pp.select_genes(tiny, n_top=2)


# ------------------------------------------------------------------------------------------------------------------
# normalize


@pytest.mark.parametrize("method", ["log_share", "log1p"])
def test_normalize_matches_hand_computation(tiny: SpatialData, method: str) -> None:
    stpred.pp.select_genes(tiny, n_top=4)
    out = tiny.tables["stpred"]
    c = out.X.astype(np.float64)
    if method == "log_share":
        expected = np.log((c + 1) / (c + 1).sum(axis=1, keepdims=True))
        # shares sum to one per spot
        np.testing.assert_allclose(np.exp(expected).sum(axis=1), 1.0)
    else:
        expected = np.log(1 + c)
    stpred.pp.normalize(tiny, method=method)
    target = out.layers["target"]
    assert target.dtype == np.float32
    assert target.shape == out.shape
    np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-6)
    assert out.uns["stpred"]["normalize"] == {"method": method}
    assert any(k.endswith("normalize") for k in out.uns["stpred"]["history"])


def test_normalize_log10_cp10k_hand_example(tiny: SpatialData) -> None:
    stpred.pp.select_genes(tiny, n_top=4)
    out = tiny.tables["stpred"]
    counts = np.zeros(out.shape)
    counts[0, :4] = [1, 3, 0, 6]  # total 10: shares 0.1, 0.3, 0, 0.6
    counts[1, :4] = [0, 0, 0, 0]  # no counts: all zeros, no NaN
    counts[2, :4] = [0, 0, 5, 0]  # one gene: log10(1 + 1e4) ≈ 4.0000434
    out.X = counts
    stpred.pp.normalize(tiny, method="log10_cp10k")
    target = out.layers["target"]
    np.testing.assert_allclose(target[0, :4], [np.log10(1001), np.log10(3001), 0.0, np.log10(6001)], rtol=1e-6)
    np.testing.assert_array_equal(target[1], 0.0)
    np.testing.assert_allclose(target[2, :4], [0.0, 0.0, 4.0000434, 0.0], rtol=1e-6)
    assert target[0, 0] == pytest.approx(3.000434, rel=1e-6)  # log10(1 + 1e4 * 0.1) by hand
    assert out.uns["stpred"]["normalize"] == {"method": "log10_cp10k"}
    history = out.uns["stpred"]["history"]
    assert any(k.endswith("normalize") and history[k]["params"]["method"] == "log10_cp10k" for k in history)


def test_normalize_uses_selected_genes_only(tiny: SpatialData) -> None:
    # the share is over the selected genes: doubling an unselected gene's counts changes nothing
    stpred.pp.select_genes(tiny, n_top=3)
    stpred.pp.normalize(tiny)
    before = tiny.tables["stpred"].layers["target"].copy()
    raw = tiny.tables["table"]
    unselected = [g for g in raw.var_names if g not in tiny.tables["stpred"].var_names]
    assert unselected
    counts = raw.X.toarray()
    counts[:, raw.var_names.get_loc(unselected[0])] *= 2
    _set_counts(tiny, counts)
    stpred.pp.normalize(tiny)
    np.testing.assert_array_equal(tiny.tables["stpred"].layers["target"], before)


def test_normalize_errors_and_rerun(tiny: SpatialData) -> None:
    with pytest.raises(KeyError, match=r"No table 'stpred'.*Run `stpred.pp.select_genes\(sdata\)` first"):
        stpred.pp.normalize(tiny)
    stpred.pp.select_genes(tiny, n_top=3)
    with pytest.raises(ValueError, match="Unknown method 'cpm'"):
        stpred.pp.normalize(tiny, method="cpm")
    stpred.pp.normalize(tiny, method="log1p")
    stpred.pp.normalize(tiny, method="log1p")  # same method again: silent
    stpred.pp.normalize(tiny, method="log_share")  # no predictions yet: switching is fine
    out = tiny.tables["stpred"]
    out.layers["stpred_hist"] = out.layers["target"].copy()
    stpred.pp.normalize(tiny, method="log_share")  # same method with predictions: fine
    with pytest.raises(ValueError, match=r"made with method 'log_share' and the prediction layers \['stpred_hist'\]"):
        stpred.pp.normalize(tiny, method="log1p")
    assert out.uns["stpred"]["normalize"]["method"] == "log_share"
    stpred.pp.normalize(tiny, method="log1p", overwrite=True)
    np.testing.assert_allclose(out.layers["target"], np.log1p(out.X), rtol=1e-6)
    out.X = out.X.copy()
    out.X[0, 0] = -2
    with pytest.raises(ValueError, match="must hold raw counts"):
        stpred.pp.normalize(tiny, method="log1p")


# ------------------------------------------------------------------------------------------------------------------
# explicit gene lists, exclusion, scanpy conventions


def _snapshot(sdata: SpatialData) -> tuple[list[str], np.ndarray]:
    return sorted(sdata.tables), sdata.tables["table"].X.toarray().copy()


def test_explicit_gene_list_keeps_order(tiny: SpatialData) -> None:
    raw = tiny.tables["table"]
    panel = [raw.var_names[5], raw.var_names[0], raw.var_names[3]]
    stpred.pp.select_genes(tiny, genes=panel)
    out = tiny.tables["stpred"]
    assert list(out.var_names) == panel
    np.testing.assert_array_equal(out.X, raw[:, panel].X.toarray())
    assert out.uns["stpred"]["gene_selection"]["flavor"] == "list"
    assert out.uns["stpred"]["gene_selection"]["n_top"] == 3


def test_explicit_gene_list_unknown_genes_raise_and_leave_object_unchanged(tiny: SpatialData) -> None:
    before = _snapshot(tiny)
    raw = tiny.tables["table"]
    unknown = [f"NOPE{i}" for i in range(12)]
    with pytest.raises(KeyError, match=r"12 of 13 requested gene\(s\) are not in .* \(first 10: \['NOPE0',.*'NOPE9'\]\)"):
        stpred.pp.select_genes(tiny, genes=[raw.var_names[0], *unknown])
    assert _snapshot(tiny)[0] == before[0]
    np.testing.assert_array_equal(_snapshot(tiny)[1], before[1])
    with pytest.raises(ValueError, match="more than once"):
        stpred.pp.select_genes(tiny, genes=[raw.var_names[0], raw.var_names[0]])
    with pytest.raises(ValueError, match=r"cannot be combined with `n_top=`"):
        stpred.pp.select_genes(tiny, genes=[raw.var_names[0]], n_top=1)
    with pytest.raises(ValueError, match=r"cannot be combined with `exclude=`"):
        stpred.pp.select_genes(tiny, genes=[raw.var_names[0]], exclude="MT-")
    with pytest.raises(TypeError, match="list of gene names"):
        stpred.pp.select_genes(tiny, genes=raw.var_names[0])
    assert "stpred" not in tiny.tables


def test_explicit_gene_list_warns_for_genes_missing_in_a_section(tiny: SpatialData) -> None:
    raw = tiny.tables["table"]
    gene = raw.var_names[2]
    raw.var.loc[gene, "present_S1"] = False
    with pytest.warns(UserWarning, match=r"1 requested gene\(s\) are not measured in every section"):
        stpred.pp.select_genes(tiny, genes=[gene])


def _mito_ribo(tiny: SpatialData) -> list[str]:
    # the three most abundant genes become MT-/RP genes
    df = _counts_frame(tiny)
    top = _expected_mean_genes(df, ["S0", "S1"], 8)
    names = {top[0]: "MT-CO1", top[1]: "Rpl13", top[2]: "RPS6KA1"}
    genes = [names.get(g, g) for g in tiny.tables["table"].var_names]
    tiny.tables["table"].var_names = pd.Index(genes)
    return [names.get(g, g) for g in top]


@pytest.mark.parametrize(
    ("exclude", "dropped"),
    [
        (("MT-", "RPL", "RPS"), 3),  # case-insensitive prefixes; RPS also catches the kinase RPS6KA1
        ("mt-", 1),
        (__import__("re").compile(r"^(MT-|RP[SL]\d+[A-Z]?\d*$|RPLP\d$|RPSA$)", __import__("re").I), 2),  # stricter: not RPS6KA1
        (lambda g: g.startswith("MT-"), 1),
    ],
)
def test_exclude_removes_matching_genes_before_ranking(tiny: SpatialData, exclude, dropped: int) -> None:
    ranked = _mito_ribo(tiny)
    expected = (
        [g for g in ranked if g not in ("MT-CO1", "Rpl13")][:4] if dropped == 2 else ranked[dropped : dropped + 4]
    )
    stpred.pp.select_genes(tiny, n_top=4, exclude=exclude)
    out = tiny.tables["stpred"]
    assert list(out.var_names) == expected
    assert out.uns["stpred"]["gene_selection"]["n_excluded"] == dropped


def test_exclude_errors(tiny: SpatialData) -> None:
    with pytest.raises(TypeError, match="Expected `exclude` to be a prefix"):
        stpred.pp.select_genes(tiny, n_top=2, exclude=[1])
    with pytest.raises(ValueError, match=r"larger than the number of genes present in all sections after `exclude` \(0\)"):
        stpred.pp.select_genes(tiny, n_top=2, exclude=lambda g: True)
    assert "stpred" not in tiny.tables


def test_select_genes_inplace_copy_key_added(tiny: SpatialData) -> None:
    table = stpred.pp.select_genes(tiny, n_top=3, inplace=False)
    assert "stpred" not in tiny.tables
    assert table.n_vars == 3
    other = stpred.pp.select_genes(tiny, n_top=3, copy=True)
    assert "stpred" not in tiny.tables
    assert list(other.tables["stpred"].var_names) == list(table.var_names)
    assert other.images["S0_hne"] is tiny.images["S0_hne"]  # shared, not copied
    other.tables["table"].X = other.tables["table"].X * 0  # the copy's tables are its own
    assert tiny.tables["table"].X.sum() > 0
    stpred.pp.select_genes(tiny, n_top=2, key_added="panel2")
    assert tiny.tables["panel2"].n_vars == 2
    assert "stpred" not in tiny.tables
    with pytest.raises(ValueError, match="`copy=True` cannot be combined with `inplace=False`"):
        stpred.pp.select_genes(tiny, n_top=2, copy=True, inplace=False)


def test_normalize_inplace_copy_key_added(tiny: SpatialData) -> None:
    stpred.pp.select_genes(tiny, n_top=3)
    out = tiny.tables["stpred"]
    target = stpred.pp.normalize(tiny, method="log1p", inplace=False)
    assert "target" not in out.layers
    np.testing.assert_allclose(target, np.log1p(out.X), rtol=1e-6)
    other = stpred.pp.normalize(tiny, copy=True)
    assert "target" not in out.layers
    assert "target" in other.tables["stpred"].layers
    stpred.pp.normalize(tiny, method="log1p", key_added="log1p")
    assert set(out.layers) == {"log1p"}
    assert out.uns["stpred"]["layers"]["log1p"] == {"method": "log1p"}
    assert "normalize" not in out.uns["stpred"]


def test_normalize_sparse_blocks_match_dense(tiny: SpatialData, monkeypatch) -> None:
    from stpred.pp import _normalize

    stpred.pp.select_genes(tiny, n_top=4)
    out = tiny.tables["stpred"]
    dense = stpred.pp.normalize(tiny, inplace=False)
    monkeypatch.setattr(_normalize, "_BLOCK_ROWS", 7)
    out.X = sparse.csr_matrix(out.X)
    np.testing.assert_allclose(stpred.pp.normalize(tiny, inplace=False), dense, rtol=1e-6)
