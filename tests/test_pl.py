from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import stpred
from stpred import metrics
from stpred.pl._domains import domains_data
from stpred.pl._history import best_epochs, history_data
from stpred.pl._scores import difference_data, gene_scores_data, scores_data
from stpred.pl._spatial import spatial_data
from stpred.pl._utils import choose_level, section_image, should_show


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def sd(sdata):
    """The shared synthetic data with genes, target and a prediction layer that is NaN on section S1."""
    stpred.pp.select_genes(sdata, n_top=8)
    stpred.pp.normalize(sdata)
    t = sdata.tables["stpred"]
    rng = np.random.default_rng(0)
    target = t.layers["target"]
    pred = (0.5 * target + 0.5 * target.mean(0) + rng.normal(scale=0.1, size=target.shape)).astype(np.float32)
    pred[t.obs["section"].to_numpy() == "S1"] = np.nan
    t.layers["stpred_m"] = pred
    return sdata


def _panel_axes(fig):
    """Axes that are not colorbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


# --------------------------------------------------------------------------------------------------- utils
def test_should_show_never_under_agg(monkeypatch):
    assert should_show(None) is False
    assert should_show(False) is False
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    df = pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5]})
    assert stpred.pl.history(df, show=True) is None  # shown -> nothing returned, as scanpy
    assert shown == [True]
    assert stpred.pl.history(df) is not None
    assert shown == [True]


def test_save_writes_file(tmp_path):
    df = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.7, 0.8]})
    out = tmp_path / "sub" / "h.png"
    ax = stpred.pl.history(df, save=out)
    assert out.stat().st_size > 1000
    assert ax.figure is not None


def test_choose_level():
    shapes = [(4000, 3000), (2000, 1500), (1000, 750)]
    assert choose_level(shapes, (4000, 3000), max_px=800) == 2
    assert choose_level(shapes, (4000, 3000), max_px=2000) == 1
    assert choose_level(shapes, (500, 500), max_px=800) == 0
    assert choose_level(shapes, (4000, 3000), max_px=10) == 2  # nothing fits: the coarsest


def test_section_image_maps_full_resolution_coordinates():
    """An image whose red channel encodes x and green channel encodes y (full-res pixel // 2)."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    h, w = 96, 160
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx // 2, yy // 2, np.zeros_like(xx)]).astype(np.uint8)
    el = Image2DModel.parse(
        img, dims=("c", "y", "x"), scale_factors=[2], chunks=(3, 64, 64), transformations={"s": Identity()}
    )
    s = SpatialData(images={"s_hne": el})
    bbox = (20.0, 10.0, 120.0, 90.0)
    rgb, extent = section_image(s, "s_hne", bbox=bbox, max_px=60)  # 100 px wide region -> level 1 (50 px)
    left, right, bottom, top = extent
    assert rgb.dtype == np.uint8
    assert rgb.shape[:2] == (40, 50)
    assert (left, right, bottom, top) == (20.0, 120.0, 90.0, 10.0)
    # centre of crop pixel (i, j) in full-res coordinates
    j = np.arange(rgb.shape[1])
    x_full = left + (j + 0.5) * (right - left) / rgb.shape[1]
    np.testing.assert_allclose(rgb[0, :, 0].astype(float), x_full // 2, atol=1.0)
    i = np.arange(rgb.shape[0])
    y_full = top + (i + 0.5) * (bottom - top) / rgb.shape[0]  # rows go down: y grows with i
    np.testing.assert_allclose(rgb[:, 0, 1].astype(float), y_full // 2, atol=1.0)
    assert section_image(s, "missing_hne", bbox=bbox) is None


# --------------------------------------------------------------------------------------------------- spatial
def test_spatial_data_shared_limits(sd):
    t = sd.tables["stpred"]
    genes = list(t.var_names[:2])
    rows = spatial_data(sd, genes, layers=("target", "stpred_m"))
    assert [(r.section, r.gene) for r in rows] == [
        ("S0", genes[0]),
        ("S0", genes[1]),
        ("S1", genes[0]),
        ("S1", genes[1]),
    ]
    j = 1
    union = np.concatenate([t.layers["target"][:, j], t.layers["stpred_m"][:, j]]).astype(float)
    lo, hi = np.percentile(union[np.isfinite(union)], [1, 99])
    for r in rows[1::2]:
        assert (r.vmin, r.vmax) == pytest.approx((lo, hi))
    s0 = (t.obs["section"] == "S0").to_numpy()
    np.testing.assert_allclose(rows[0].values["target"], t.layers["target"][s0, 0])
    np.testing.assert_allclose(rows[0].xy, t.obsm["spatial"][s0])
    assert np.isnan(rows[2].values["stpred_m"]).all()


def test_spatial_renders(sd):
    t = sd.tables["stpred"]
    genes = list(t.var_names[:2])
    fig = stpred.pl.spatial(sd, genes, layers=("target", "stpred_m"))
    panels = _panel_axes(fig)
    assert len(panels) == 2 * 2 * 2  # (2 sections x 2 genes) rows x 2 layers
    assert len(fig.axes) - len(panels) == 4  # one colorbar per row
    rows = spatial_data(sd, genes, layers=("target", "stpred_m"))
    for r, row in enumerate(rows):
        pair = panels[2 * r : 2 * r + 2]
        limits = {(ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) for ax in pair}
        assert limits == {(row.vmin, row.vmax)}
        assert len(pair[0].images) == 1  # the H&E
        assert pair[0].get_ylim()[0] > pair[0].get_ylim()[1]  # y points down, as in the image
    assert panels[0].get_title() == f"{genes[0]} — measured"
    assert panels[1].get_title() == f"{genes[0]} — stpred_m"
    assert "no values" in panels[5].get_title()  # S1 has no prediction


def test_spatial_without_image_and_given_axes(sd):
    gene = str(sd.tables["stpred"].var_names[0])
    fig, axes = plt.subplots(1, 2)
    out = stpred.pl.spatial(sd, gene, layers=("target", "stpred_m"), sections="S0", img=False, axes=axes)
    assert out is fig
    assert all(len(ax.images) == 0 for ax in axes)
    with pytest.raises(ValueError, match="Expected 2 axes in `axes`"):
        stpred.pl.spatial(sd, gene, layers=("target", "stpred_m"), sections="S0", axes=axes[:1])


def test_spatial_errors(sd):
    with pytest.raises(KeyError, match=r"Gene\(s\) \['ERBB2'\] not in table 'stpred'; available genes: \['G"):
        stpred.pl.spatial(sd, "ERBB2", layers=("target",))
    with pytest.raises(KeyError, match=r"Layer\(s\) \['stpred_hifusion'\].*available layers: \['stpred_m', 'target'\]"):
        stpred.pl.spatial(sd, str(sd.tables["stpred"].var_names[0]))
    with pytest.raises(ValueError, match=r"Unknown section\(s\) \['S9'\]"):
        stpred.pl.spatial(sd, str(sd.tables["stpred"].var_names[0]), layers="target", sections="S9")


def test_spatial_std_ood_alpha_and_per_panel_scale(sd):
    t = sd.tables["stpred"]
    gene = str(t.var_names[0])
    rng = np.random.default_rng(1)
    t.layers["stpred_m_std"] = rng.uniform(0.0, 0.2, size=t.shape).astype(np.float32)
    flag = np.zeros(t.n_obs, dtype=bool)
    flag[:5] = True  # the first spots of S0
    t.obs["stpred_m_ood_flag"] = flag
    layers = ("target", "stpred_m", "stpred_m_std")
    fig = stpred.pl.spatial(sd, gene, layers=layers, sections="S0", alpha=0.5, ood="hatch")
    panels = _panel_axes(fig)
    spots = [ax.collections[0] for ax in panels]
    assert all(c.get_alpha() == 0.5 for c in spots)
    assert spots[0].norm.vmax == spots[1].norm.vmax  # measured and predicted share a scale
    std = t.layers["stpred_m_std"][(t.obs["section"] == "S0").to_numpy(), 0]
    assert spots[2].norm.vmax == pytest.approx(np.percentile(std, 99))  # the std has its own
    assert len(panels[0].collections) == 1  # no flag for the measured layer
    assert len(panels[1].collections) == 2  # hatched outlines over the 5 flagged spots
    assert len(panels[1].collections[1].get_offsets()) == 5
    # per-panel scales; masked OOD spots become NaN (grey)
    fig = stpred.pl.spatial(sd, gene, layers=("target", "stpred_m"), sections="S0", vmax="p99", ood="mask")
    spots = [ax.collections[0] for ax in _panel_axes(fig)]
    s0 = (t.obs["section"] == "S0").to_numpy()
    assert spots[1].norm.vmax == pytest.approx(np.percentile(t.layers["stpred_m"][s0 & ~flag, 0], 99))
    assert np.ma.getmaskarray(spots[1].get_array())[:5].all()
    assert len(fig.axes) - len(_panel_axes(fig)) == 2  # one colorbar per panel
    with pytest.raises(ValueError, match="alpha"):
        stpred.pl.spatial(sd, gene, layers="target", alpha=2)
    with pytest.raises(ValueError, match="vmax"):
        stpred.pl.spatial(sd, gene, layers="target", vmax="p95")
    with pytest.raises(KeyError, match="ood=True"):
        stpred.pl.spatial(sd, gene, layers="target", ood="hatch")


# --------------------------------------------------------------------------------------------------- scores
def _tidy(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for key, base in (("stpred_a", 0.5), ("stpred_b", 0.2)):
        for s in ("S0", "S1", "S2"):
            rows.append(
                {"key": key, "section": s, "metric": "pcc_gene", "value": base + rng.normal(scale=0.05), "n_spots": 50}
            )
            rows.append({"key": key, "section": s, "metric": "mse", "value": 1 - base, "n_spots": 50})
        rows.append({"key": key, "section": "pooled", "metric": "pcc_gene", "value": base + 0.1, "n_spots": 150})
    return pd.DataFrame(rows)


def test_scores_data(sd):
    frame = _tidy(np.random.default_rng(0))
    summary, points = scores_data(frame, metric="pcc_gene")  # no `model` column -> bars by `key`
    assert list(summary["key"]) == ["stpred_a", "stpred_b"]
    sub = frame[(frame.metric == "pcc_gene") & (frame.section != "pooled") & (frame.key == "stpred_a")]["value"]
    assert summary.loc[0, "mean"] == pytest.approx(sub.mean())
    assert summary.loc[0, "sd"] == pytest.approx(sub.std(ddof=1))
    assert summary.loc[0, "n"] == 3
    assert summary.loc[1, "pooled"] == pytest.approx(0.3)
    assert len(points) == 6

    # a concatenation of CV folds with a model column: pooled averaged over folds
    cv = pd.concat([frame.assign(fold=0, model="m"), frame.assign(fold=1, model="m")], ignore_index=True)
    cv.loc[(cv.fold == 1) & (cv.section == "pooled"), "value"] += 0.2
    summary, _ = scores_data(cv, metric="pcc_gene", by="model")
    assert list(summary["model"]) == ["m"]
    assert summary.loc[0, "n"] == 12
    assert summary.loc[0, "pooled"] == pytest.approx(np.mean([0.6, 0.3, 0.8, 0.5]))

    with pytest.raises(ValueError, match=r"Unknown metric 'pcc'; the frame has \['pcc_gene', 'mse'\]"):
        scores_data(frame, metric="pcc")
    with pytest.raises(KeyError, match="No column 'fold'"):
        scores_data(frame, by="fold")
    with pytest.raises(KeyError, match="lacks column"):
        scores_data(frame.drop(columns="value"))
    with pytest.raises(TypeError, match="tidy metrics DataFrame"):
        scores_data([1, 2])


def test_scores_renders():
    frame = _tidy(np.random.default_rng(1))

    class Result:  # CVResult-like
        metrics = frame

    ax = stpred.pl.scores(Result())
    bars = [p for p in ax.patches if p.get_height() != 0]
    assert len(bars) == 2
    assert bars[0].get_height() == pytest.approx(
        frame.query("key == 'stpred_a' and section != 'pooled' and metric == 'pcc_gene'")["value"].mean()
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stpred_a", "stpred_b"]
    undefined = frame.copy()
    undefined.loc[(undefined.key == "stpred_b") & (undefined.metric == "pcc_gene"), "value"] = np.nan
    ax = stpred.pl.scores(undefined)
    assert "n/a" in [t.get_text() for t in ax.texts]
    ax = stpred.pl.scores(frame, by="section", hue="key", metric="mse")
    assert len(ax.patches) == 3 * 2
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"stpred_a", "stpred_b"}


def _compared() -> pd.DataFrame:
    """`tl.evaluate(..., compare=[...])` on a hand-made table: a model and a constant baseline, three sections."""
    from anndata import AnnData

    rng = np.random.default_rng(5)
    target = rng.normal(size=(90, 40)).astype(np.float32)
    obs = pd.DataFrame({"section": np.repeat(["S0", "S1", "S2"], 30)}, index=[f"c{i}" for i in range(90)])
    table = AnnData(X=np.abs(target), obs=obs)
    table.layers["target"] = target
    table.layers["stpred_m"] = target + rng.normal(size=target.shape).astype(np.float32)
    table.layers["baseline_mean"] = np.broadcast_to(target.mean(0), target.shape).copy()
    return stpred.tl.evaluate(table, "stpred_m", compare=["baseline_mean"], n_boot=100)


def test_scores_data_skips_headline_rows():
    frame = _compared()
    summary, points = scores_data(frame, metric="pcc_gene")
    assert set(points["section"]) == {"S0", "S1", "S2"}
    model = summary.set_index("key").loc["stpred_m"]
    assert model["n"] == 3
    headline = frame.query("key == 'stpred_m' and section == 'mean_over_sections' and metric == 'pcc_gene'")
    assert model["mean"] == pytest.approx(headline["value"].item())
    with pytest.raises(ValueError, match="kind='difference'"):
        scores_data(frame, metric="pcc_gene_diff")


def test_difference_data_and_plot():
    frame = _compared()
    data = difference_data(frame)
    assert list(data["group"]) == ["S0", "S1", "S2", "mean_over_sections", "pooled"]
    assert set(data["comparator"]) == {"baseline_mean"}
    head = data.iloc[3]
    assert head["ci_low_genes"] < head["value"] < head["ci_high_genes"]
    assert np.isfinite(head["ci_low_sections"])

    class Result:  # CVResult-like: the comparison is read from `overall`
        metrics = frame.iloc[:0]
        overall = frame

    pd.testing.assert_frame_equal(difference_data(Result()), data)
    with pytest.raises(KeyError, match="No comparison for key 'x'"):
        difference_data(frame, key="x")
    with pytest.raises(ValueError, match="compare="):
        difference_data(frame[frame["metric"] != "pcc_gene_diff"])
    ax = stpred.pl.scores(frame, kind="difference")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S0", "S1", "S2", "mean over\nsections", "pooled"]
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"stpred_m − baseline_mean", "95 % CI over sections"}
    with pytest.raises(ValueError, match="Unknown kind"):
        stpred.pl.scores(frame, kind="scatter")


def test_gene_scores(sd):
    t = sd.tables["stpred"]
    s0 = (t.obs["section"] == "S0").to_numpy()
    data = gene_scores_data(sd, "stpred_m")
    ref = metrics.pcc_per_gene(t.layers["stpred_m"][s0], t.layers["target"][s0])
    expected = pd.Series(ref, index=list(t.var_names)).dropna().sort_values(ascending=False)
    assert list(data.index) == list(expected.index)
    np.testing.assert_allclose(data.to_numpy(), expected.to_numpy())
    assert data.attrs["n_spots"] == s0.sum()  # S1 has no prediction
    r2 = gene_scores_data(sd, "stpred_m", metric="r2")
    assert r2.iloc[0] == pytest.approx(np.nanmax(metrics.r2_per_gene(t.layers["stpred_m"][s0], t.layers["target"][s0])))

    fig = stpred.pl.gene_scores(sd, "stpred_m", n=3)
    best, worst = _panel_axes(fig)
    assert len(best.patches) == 3
    assert len(worst.patches) == 3
    assert [tl.get_text() for tl in best.get_yticklabels()] == list(data.index[:3])
    assert [tl.get_text() for tl in worst.get_yticklabels()] == list(data.index[::-1][:3])
    assert best.get_xlim() == worst.get_xlim()

    with pytest.raises(ValueError, match="Unknown metric 'mse'"):
        gene_scores_data(sd, "stpred_m", metric="mse")
    with pytest.raises(KeyError, match=r"Layer\(s\) \['nope'\]"):
        stpred.pl.gene_scores(sd, "nope")
    with pytest.raises(ValueError, match="has values for 0 spot"):
        stpred.pl.gene_scores(sd, "stpred_m", sections="S1")
    with pytest.raises(ValueError, match="`n` to be positive"):
        stpred.pl.gene_scores(sd, "stpred_m", n=0)


# --------------------------------------------------------------------------------------------------- history
def test_history():
    e = np.arange(10)
    val = (e - 6.0) ** 2 / 10 + 0.5
    df = pd.DataFrame({"epoch": e, "phase": 1, "train_loss": 2.0 / (e + 1), "val_loss": val, "lr": 1e-3})

    class Pred:
        history = df

    frame, keys = history_data(Pred())
    assert keys == ["train_loss", "val_loss"]
    best = best_epochs(frame)
    assert list(best["epoch"]) == [6]
    ax = stpred.pl.history(Pred())
    assert len(ax.get_lines()) == 2 + 1  # two curves, one best-epoch line
    assert ax.collections[0].get_offsets()[0].tolist() == [6.0, pytest.approx(0.5)]
    assert "best epoch 6" in [t.get_text() for t in ax.get_legend().get_texts()][2]

    # two phases follow each other; one curve per phase; best epoch per phase
    two = pd.concat([df, df.assign(phase=2)], ignore_index=True)
    frame, _ = history_data(two)
    assert frame["step"].tolist() == list(range(20))
    assert best_epochs(frame)["step"].tolist() == [6, 16]
    # folds and an epoch index
    folds = pd.concat([df.assign(fold=f) for f in range(3)], ignore_index=True)
    ax = stpred.pl.history(folds)
    assert len(ax.collections) == 3  # one best-epoch dot per fold

    class CV:  # CVResult-like: a list of per-fold histories
        histories = [df, df]

    frame, _ = history_data(CV())
    assert sorted(set(frame["run"])) == [0, 1]
    by_index = df.set_index("epoch")[["train_loss"]]
    frame, keys = history_data(by_index)
    assert keys == ["train_loss"]
    assert frame["epoch"].tolist() == list(range(10))

    with pytest.raises(ValueError, match="history is empty"):
        stpred.pl.history(pd.DataFrame())
    with pytest.raises(KeyError, match="No loss column"):
        stpred.pl.history(df[["epoch", "lr"]])
    with pytest.raises(KeyError, match=r"Column\(s\) \['val_pcc'\] not in the history"):
        stpred.pl.history(df, keys=["val_pcc"])
    with pytest.raises(TypeError, match="object with a `.history` DataFrame"):
        stpred.pl.history(3)


# --------------------------------------------------------------------------------------------------- domains
def test_domains_data_and_plot(sd):
    t = sd.tables["stpred"]
    rng = np.random.default_rng(0)
    truth = rng.choice(["a", "b", "c"], t.n_obs)
    t.obs["dom_true"] = pd.Categorical(truth)
    mapping = {"a": "2", "b": "0", "c": "1"}  # the same partition under other names
    t.obs["dom_pred"] = pd.Categorical([mapping[v] for v in truth])
    t.obs.loc[t.obs_names[:5], "dom_pred"] = np.nan

    panels, colors = domains_data(sd, ["dom_true", "dom_pred"])
    assert [(p["section"], p["key"]) for p in panels] == [
        ("S0", "dom_true"),
        ("S0", "dom_pred"),
        ("S1", "dom_true"),
        ("S1", "dom_pred"),
    ]
    for a, b in mapping.items():  # matched domains share a colour
        assert colors["dom_pred"][b] == colors["dom_true"][a]
    assert len(set(colors["dom_true"].values())) == 3
    assert sum(v is None for v in panels[1]["labels"]) == 5
    _, plain = domains_data(sd, ["dom_true", "dom_pred"], align=False)
    assert plain["dom_pred"]["0"] == plain["dom_true"]["a"]  # default palette, by category order

    fig = stpred.pl.domains(sd, ["dom_true", "dom_pred"])
    axes = fig.axes
    assert len(axes) == 4
    # the same category has the same colour in both sections
    from matplotlib.colors import to_hex

    s0 = (t.obs["section"] == "S0").to_numpy()
    first_a_s0 = int(np.flatnonzero(truth[s0] == "a")[0])
    first_a_s1 = int(np.flatnonzero(truth[~s0] == "a")[0])
    fc0 = axes[0].collections[0].get_facecolor()[first_a_s0]
    fc1 = axes[2].collections[0].get_facecolor()[first_a_s1]
    assert to_hex(fc0) == to_hex(fc1) == colors["dom_true"]["a"]
    legend_texts = [tx.get_text() for tx in axes[3].get_legend().get_texts()]
    assert legend_texts == ["0", "1", "2", "no label"]
    assert len(axes[0].images) == 1

    with pytest.raises(KeyError, match=r"No column\(s\) \['domains_target'\].*stpred.tl.domains"):
        stpred.pl.domains(sd, "domains_target")


def test_domains_end_to_end(sd):
    stpred.tl.domains(sd, layer="target", n_domains=3)
    fig = stpred.pl.domains(sd, "domains_target", sections="S0", img=False)
    assert len(fig.axes) == 1
    assert len(fig.axes[0].collections[0].get_facecolor()) == int((sd.tables["stpred"].obs["section"] == "S0").sum())
