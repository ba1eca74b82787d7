"""Bad input is refused at the boundary, before any work, and the refused call leaves the object exactly unchanged."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import sparse

import stpred
from stpred._validate import check_device


def _set_raw(sdata, values):
    table = sdata.tables["table"]
    table.X = sparse.csr_matrix(values.astype(np.float32))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda x: np.log1p(x), r"look log-transformed or normalised .*layers\['counts'\].*allow_non_integer=True"),
        (lambda x: x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4, r"look (log-transformed or )?normalised"),
        (lambda x: np.where(x > 0, np.nan, x), r"contain NaN or infinite values \(\d+ NaN, 0 inf\)"),
        (lambda x: np.where(x > 2, np.inf, x), r"contain NaN or infinite values \(0 NaN, \d+ inf\)"),
        (lambda x: x - x.mean(), r"negative values .*not raw counts"),
    ],
    ids=["log1p", "cp10k", "nan", "inf", "centred"],
)
def test_select_genes_refuses_non_counts(sdata, assert_unchanged, damage, match):
    _set_raw(sdata, damage(sdata.tables["table"].X.toarray().astype(np.float64)))
    with assert_unchanged(sdata), pytest.raises(ValueError, match=match):
        stpred.pp.select_genes(sdata, n_top=4)


def test_select_genes_allow_non_integer_warns_and_normalize_follows(sdata):
    _set_raw(sdata, sdata.tables["table"].X.toarray() * 0.5)
    with pytest.warns(UserWarning, match=r"not integers .*used as counts because `allow_non_integer=True`"):
        stpred.pp.select_genes(sdata, n_top=4, allow_non_integer=True)
    assert sdata.tables["stpred"].uns["stpred"]["gene_selection"]["allow_non_integer"] is True
    with pytest.warns(UserWarning, match="allow_non_integer=True"):
        stpred.pp.normalize(sdata)
    assert np.isfinite(sdata.tables["stpred"].layers["target"]).all()


def test_select_genes_refuses_duplicate_names(sdata, assert_unchanged):
    table = sdata.tables["table"]
    genes = list(table.var_names)
    table.var_names = [genes[0], genes[0], *genes[2:]]
    with assert_unchanged(sdata), pytest.raises(ValueError, match=r"1 duplicate gene \(var\) names \(first: \['"):
        stpred.pp.select_genes(sdata, n_top=4)
    table.var_names = genes
    spots = list(table.obs_names)
    table.obs_names = [spots[0], *spots[:-1]]
    with assert_unchanged(sdata), pytest.raises(ValueError, match=r"duplicate spot \(obs\) names.*obs_names_make_unique"):
        stpred.pp.select_genes(sdata, n_top=4)


def test_select_genes_refuses_a_table_without_spots(sdata, assert_unchanged):
    table = sdata.tables["table"]
    table._inplace_subset_obs(np.zeros(table.n_obs, dtype=bool))  # spatialdata refuses to assign an empty table
    with assert_unchanged(sdata), pytest.raises(ValueError, match=r"Table 'table' has no spots \(0 rows\)"):
        stpred.pp.select_genes(sdata, n_top=4)


@pytest.fixture
def selected(sdata):
    stpred.pp.select_genes(sdata, n_top=4)
    return sdata


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda x: np.log1p(x), r"counts of table 'stpred' look log-transformed"),
        (lambda x: np.where(x > 0, np.nan, x), r"counts of table 'stpred' contain NaN or infinite values \(\d+ NaN"),
        (lambda x: -x - 1, r"counts of table 'stpred' contain negative values"),
    ],
    ids=["log1p", "nan", "negative"],
)
def test_normalize_refuses_non_counts(selected, assert_unchanged, damage, match):
    table = selected.tables["stpred"]
    table.X = damage(np.asarray(table.X, dtype=np.float64)).astype(np.float32)
    with assert_unchanged(selected), pytest.raises(ValueError, match=match):
        stpred.pp.normalize(selected)


def test_normalize_refuses_duplicate_spots(selected, assert_unchanged):
    table = selected.tables["stpred"]
    table.obs_names = [table.obs_names[1], *table.obs_names[1:]]
    with assert_unchanged(selected), pytest.raises(ValueError, match=r"duplicate spot \(obs\) names"):
        stpred.pp.normalize(selected)


def test_extract_patches_refuses_duplicate_spots(selected, assert_unchanged):
    table = selected.tables["stpred"]
    table.obs_names = [table.obs_names[1], *table.obs_names[1:]]
    with assert_unchanged(selected), pytest.raises(ValueError, match=r"duplicate spot \(obs\) names"):
        stpred.pp.extract_patches(selected, size=8, context_size=None, progress=False)


def test_crops_larger_than_the_image_warn_with_the_padded_fraction():
    sdata = stpred.datasets.synthetic(n_sections=1, n_genes=6, grid=4, pitch=16, seed=0)  # a 64 px image
    stpred.pp.select_genes(sdata, n_top=3)
    with pytest.warns(UserWarning, match=r"spot crops of 96×96 px .*64×64 px image for \d+ of \d+ spots; \d+\.\d% of"):
        stpred.pp.extract_patches(sdata, size=96, context_size=None, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # crops well inside the image: no warning
        stpred.pp.extract_patches(sdata, size=4, context_size=None, progress=False)


def test_plots_refuse_missing_coordinates(selected, assert_unchanged):
    stpred.pp.normalize(selected)
    del selected.tables["stpred"].obsm["spatial"]
    with assert_unchanged(selected), pytest.raises(KeyError, match=r"no `obsm\['spatial'\]`.*needed for spatial plots"):
        stpred.pl.spatial(selected, selected.tables["stpred"].var_names[0], layers="target", img=False, show=False)
    table = selected.tables["stpred"]
    table.obs["domain"] = (np.arange(table.n_obs) % 2).astype(str)
    table.obs["domain"] = table.obs["domain"].astype("category")
    with assert_unchanged(selected), pytest.raises(KeyError, match=r"no `obsm\['spatial'\]`.*needed for domain plots"):
        stpred.pl.domains(selected, "domain", img=False, show=False)


def test_predict_refuses_a_device_it_cannot_use(selected, assert_unchanged, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with assert_unchanged(selected), pytest.raises(ValueError, match=r"device='cuda' was requested but CUDA is not"):
        stpred.tl.predict(selected, "hifusion", device="cuda")
    with assert_unchanged(selected), pytest.raises(ValueError, match=r"Unknown device 'gpu'"):
        stpred.tl.predict(selected, "hifusion", device="gpu")
    with pytest.raises(TypeError, match="`device` must be a string"):
        check_device(0.5)
    assert check_device(None) == "cpu"
    assert check_device("cpu") == "cpu"


@pytest.mark.gpu
def test_check_device_on_a_gpu():
    assert check_device(None) == "cuda"
    assert check_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match=r"only \d+ CUDA device\(s\) are visible"):
        check_device(f"cuda:{torch.cuda.device_count()}")
