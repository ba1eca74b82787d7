from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import stpred

GRID = 12  # 12 x 12 spots per section
N_GENES = 9


def _tiny_sdata(*, noise: float = 0.3, seed: int = 0):
    """Two sections on the same 12 x 12 square lattice (identical pixel coordinates), with three spatial domains.

    Domain = which third of the section (by x) a spot lies in; genes 0-2 mark domain 0, 3-5 domain 1, 6-8 domain 2.
    ``layers["target"]`` = programme + Gaussian noise of scale ``noise``. Images are left out (not needed here).
    """
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(seed)
    pitch = 10.0
    ay, ax = np.divmod(np.arange(GRID * GRID), GRID)
    xy = np.stack([(ax + 0.5) * pitch, (ay + 0.5) * pitch], axis=1)
    shapes, obs, spatial, domain = {}, [], [], []
    for s in ("A", "B"):
        shapes[f"{s}_spots"] = ShapesModel.parse(
            xy, geometry=0, radius=np.full(len(xy), pitch / 4), transformations={s: Identity()}
        )
        obs.append(
            pd.DataFrame(
                {
                    "region": f"{s}_spots",
                    "spot_id": np.arange(len(xy), dtype=np.int64),
                    "section": s,
                    "patient": "P",
                    "array_x": ax,
                    "array_y": ay,
                },
                index=[f"{s}_{x}x{y}" for x, y in zip(ax, ay)],
            )
        )
        spatial.append(xy)
        domain.append(np.minimum(ax * 3 // GRID, 2))
    obs = pd.concat(obs)
    for c in ("region", "section", "patient"):
        obs[c] = obs[c].astype("category")
    dom = np.concatenate(domain)
    prog = np.zeros((len(dom), N_GENES))
    prog[np.arange(len(dom))[:, None], dom[:, None] * 3 + np.arange(3)] = 2.0
    target = (prog + rng.normal(scale=noise, size=prog.shape)).astype(np.float32)
    adata = ad.AnnData(
        X=np.ones_like(target),
        obs=obs,
        var=pd.DataFrame(index=[f"G{g}" for g in range(N_GENES)]),
        obsm={"spatial": np.concatenate(spatial)},
        layers={"target": target},
    )
    adata.obs["truth_domain"] = pd.Categorical(dom.astype(str))
    adata.uns["stpred"] = {"technology": {"A": "synthetic", "B": "synthetic"}}
    table = TableModel.parse(adata, region=["A_spots", "B_spots"], region_key="region", instance_key="spot_id")
    return SpatialData(shapes=shapes, tables={"stpred": table})


@pytest.fixture(scope="module")
def _tiny_once():
    return _tiny_sdata()


@pytest.fixture
def tiny(_tiny_once):
    import spatialdata as sd

    return sd.deepcopy(_tiny_once)


def test_domains_kmeans_recovers_programmes(tiny):
    stpred.tl.domains(tiny, layer="target", n_domains=3, n_pcs=5)
    t = tiny.tables["stpred"]
    labels = t.obs["domains_target"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == ["0", "1", "2"]
    assert adjusted_rand_score(t.obs["truth_domain"], labels) > 0.9
    # labels ordered by size
    sizes = labels.value_counts().reindex(["0", "1", "2"]).to_numpy()
    assert (np.diff(sizes) <= 0).all()
    assert t.obsm["X_pca_domains_target"].shape == (t.n_obs, 5)
    params = t.uns["stpred"]["domains"]["domains_target"]
    assert params["method"] == "kmeans"
    assert params["n_domains"] == 3
    assert any(k.endswith("tl.domains") for k in t.uns["stpred"]["history"])


def test_domains_leiden_recovers_programmes(tiny):
    stpred.tl.domains(tiny, layer="target", resolution=0.3, key_added="leiden_dom", random_state=1)
    t = tiny.tables["stpred"]
    assert adjusted_rand_score(t.obs["truth_domain"], t.obs["leiden_dom"]) > 0.9
    assert t.uns["stpred"]["domains"]["leiden_dom"]["method"] == "leiden"


def test_spatial_smoothing_helps_on_noisy_layer():
    sdata = _tiny_sdata(noise=1.6, seed=3)
    t = sdata.tables["stpred"]
    stpred.tl.domains(sdata, layer="target", n_domains=3, key_added="raw")
    stpred.tl.domains(sdata, layer="target", n_domains=3, spatial_smoothing=0.8, key_added="smooth")
    ari_raw = adjusted_rand_score(t.obs["truth_domain"], t.obs["raw"])
    ari_smooth = adjusted_rand_score(t.obs["truth_domain"], t.obs["smooth"])
    assert ari_smooth > ari_raw + 0.1
    assert ari_smooth > 0.8


def test_spatial_graph_never_crosses_sections(tiny):
    from stpred.tl._domains import spatial_graph

    t = tiny.tables["stpred"]
    g = spatial_graph(t).tocoo()
    sec = t.obs["section"].to_numpy()
    assert g.nnz > 0
    assert (sec[g.row] == sec[g.col]).all()  # both sections share pixel coordinates: a global kNN would mix them
    # interior spots of a square lattice get their 4 axis neighbours
    assert int(np.median(np.asarray((g.tocsr() > 0).sum(axis=1)).ravel())) == 4


def test_domains_nan_rows_left_out(tiny):
    t = tiny.tables["stpred"]
    layer = t.layers["target"].copy()
    layer[t.obs["section"].to_numpy() == "B"] = np.nan
    t.layers["pred_partial"] = layer
    with pytest.warns(UserWarning, match="144 of 288 spots have NaN"):
        stpred.tl.domains(tiny, layer="pred_partial", n_domains=3, spatial_smoothing=0.5)
    lab = t.obs["domains_pred_partial"]
    assert lab[t.obs["section"] == "B"].isna().all()
    assert lab[t.obs["section"] == "A"].notna().all()


def test_domains_errors(tiny):
    with pytest.raises(KeyError, match=r"No layer 'nope' in table 'stpred'; available layers: \['target'\]"):
        stpred.tl.domains(tiny, layer="nope")
    with pytest.raises(ValueError, match=r"`n_domains` between 2 and the number of spots \(288\), found 1"):
        stpred.tl.domains(tiny, layer="target", n_domains=1)
    with pytest.raises(TypeError, match="`n_domains` to be an integer"):
        stpred.tl.domains(tiny, layer="target", n_domains=2.5)
    with pytest.raises(ValueError, match=r"`spatial_smoothing` in \[0, 1\]"):
        stpred.tl.domains(tiny, layer="target", spatial_smoothing=1.5)
    with pytest.raises(ValueError, match="`resolution` to be positive"):
        stpred.tl.domains(tiny, layer="target", resolution=0)
    del tiny.tables["stpred"]
    with pytest.raises(KeyError, match=r"No table 'stpred'.*Run `stpred.pp.select_genes\(sdata\)` first"):
        stpred.tl.domains(tiny, layer="target")


def test_domain_agreement_matches_sklearn(tiny):
    t = tiny.tables["stpred"]
    rng = np.random.default_rng(0)
    noisy = t.obs["truth_domain"].astype(str).to_numpy().copy()
    flip = rng.random(t.n_obs) < 0.3
    noisy[flip] = rng.choice(["0", "1", "2", "3"], flip.sum())
    t.obs["noisy"] = pd.Categorical(noisy)
    out = stpred.tl.domain_agreement(tiny, "noisy", "truth_domain")
    truth = t.obs["truth_domain"].astype(str)
    assert out["ari"] == pytest.approx(adjusted_rand_score(truth, noisy))
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(truth, noisy))
    assert out["n_spots"] == t.n_obs
    assert 0.2 < out["ari"] < 0.9

    per = stpred.tl.domain_agreement(tiny, "noisy", "truth_domain", by="section")
    assert list(per.index) == ["A", "B"]
    a = (t.obs["section"] == "A").to_numpy()
    assert per.loc["A", "ari"] == pytest.approx(adjusted_rand_score(truth[a], noisy[a]))
    assert per.loc["B", "nmi"] == pytest.approx(normalized_mutual_info_score(truth[~a], noisy[~a]))

    # missing labels are left out
    t.obs["partial"] = t.obs["noisy"].copy()
    t.obs.loc[t.obs_names[:10], "partial"] = np.nan
    out = stpred.tl.domain_agreement(tiny, "partial", "truth_domain")
    assert out["n_spots"] == t.n_obs - 10
    assert out["ari"] == pytest.approx(adjusted_rand_score(truth[10:], noisy[10:]))

    with pytest.raises(KeyError, match=r"No column 'domains_x' in `obs`.*stpred.tl.domains"):
        stpred.tl.domain_agreement(tiny, "domains_x", "truth_domain")
    with pytest.raises(KeyError, match="No column 'slide'"):
        stpred.tl.domain_agreement(tiny, "noisy", "truth_domain", by="slide")


def test_spatial_autocorr_agreement(tiny):
    t = tiny.tables["stpred"]
    rng = np.random.default_rng(0)
    x = t.obs["array_x"].to_numpy().astype(float)
    y = t.obs["array_y"].to_numpy().astype(float)
    truth = t.layers["target"].copy()
    truth[:, 0] = np.sin(x / 3.0) + np.cos(y / 4.0)  # smooth
    truth[:, 1] = rng.permutation(truth[:, 0])  # same values, no spatial structure
    truth[:, 2] = 1.0  # constant
    t.layers["target"] = truth
    pred = truth + rng.normal(scale=0.1, size=truth.shape).astype(np.float32)
    t.layers["stpred_m"] = pred
    df = stpred.tl.spatial_autocorr_agreement(tiny, layer="stpred_m")
    assert list(df.index) == list(t.var_names)
    assert list(df.columns) == ["I_pred", "I_truth", "delta"]
    assert df.loc["G0", "I_truth"] > 0.5
    assert df.loc["G0", "I_truth"] > df.loc["G1", "I_truth"] + 0.4
    assert df.loc["G0", "I_pred"] > df.loc["G1", "I_pred"] + 0.4
    assert np.isnan(df.loc["G2", "I_truth"])
    assert df.attrs["n_genes"] == N_GENES - 1
    assert df.attrs["pearson"] > 0.8
    assert df.attrs["n_spots"] == t.n_obs

    # Moran's I by hand on the same graph (row-normalised weights), for the smooth gene
    from stpred.tl._domains import spatial_graph

    w = spatial_graph(t).astype(float)
    w = w.multiply(1.0 / np.asarray(w.sum(axis=1))).tocsr()
    z = truth[:, 0] - truth[:, 0].mean()
    moran = len(z) / w.sum() * (z @ (w @ z)) / (z @ z)
    assert df.loc["G0", "I_truth"] == pytest.approx(moran, rel=1e-4)

    sub = stpred.tl.spatial_autocorr_agreement(tiny, layer="stpred_m", genes=["G0", "G1"])
    assert list(sub.index) == ["G0", "G1"]
    with pytest.raises(KeyError, match=r"Gene\(s\) \['XX'\] not in table 'stpred'"):
        stpred.tl.spatial_autocorr_agreement(tiny, layer="stpred_m", genes=["XX"])
    with pytest.raises(KeyError, match=r"No layer 'stpred_hifusion'.*available layers: \['stpred_m', 'target'\]"):
        stpred.tl.spatial_autocorr_agreement(tiny, layer="stpred_hifusion")


def test_domains_never_overwrite_silently(sdata):
    import stpred as _st

    _st.pp.select_genes(sdata, n_top=6)
    _st.pp.normalize(sdata)
    _st.tl.domains(sdata, layer="target", n_domains=2, key_added="d")
    with pytest.raises(ValueError, match=r"`obs\['d'\]` already exists; pass `overwrite=True`"):
        _st.tl.domains(sdata, layer="target", n_domains=3, key_added="d")
    _st.tl.domains(sdata, layer="target", n_domains=3, key_added="d", overwrite=True)
    assert sdata.tables["stpred"].obs["d"].nunique() == 3
