"""The training engine and the tl API, driven by two tiny models defined here (one per batching mode)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import stpred
from stpred.models import LossOutput, StpredModel, TrainDefaults, register_model
from stpred.tl._splits import sample_specific_folds, slide_wise_folds, validation_split


@dataclass(frozen=True)
class _ToyConfig:
    n_genes: int
    spot_size: int = 32
    width: int = 4
    train: TrainDefaults = field(default_factory=lambda: TrainDefaults(lr=1e-2, max_epochs=3, batch_size=16))


@register_model("toy_cnn")
class ToyCNN(StpredModel):
    inputs = ("spot",)
    batching = "spots"

    def __init__(self, n_genes: int, **config) -> None:
        super().__init__()
        self.config = _ToyConfig(n_genes, **config)
        self.conv = nn.Conv2d(3, self.config.width, 3, padding=1)
        self.head = nn.Linear(self.config.width * 2, n_genes)
        self.augment_calls: list[float] = []

    @property
    def crop_sizes(self):
        return self.config.spot_size, None

    def forward(self, batch):
        x = batch["spot"].float() / 255.0
        h = torch.relu(self.conv(x))
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)
        return {"pred": self.head(h)}

    def loss(self, out, batch):
        mse = nn.functional.mse_loss(out["pred"], batch["target"])
        return LossOutput(loss=mse, mse=mse.detach())

    def augment(self, batch, progress):
        self.augment_calls.append(progress)
        return batch


@dataclass(frozen=True)
class _ToySlideConfig:
    in_dim: int
    n_genes: int
    train: TrainDefaults = field(default_factory=lambda: TrainDefaults(lr=1e-2, max_epochs=3, batch_size=1))


@register_model("toy_slide")
class ToySlide(StpredModel):
    inputs = ("embedding", "coords")
    batching = "slide"
    data_sizes = ("in_dim", "n_genes")

    def __init__(self, in_dim: int, n_genes: int, **config) -> None:
        super().__init__()
        self.config = _ToySlideConfig(in_dim, n_genes, **config)
        self.lin = nn.Linear(in_dim + 2, n_genes)
        self.seen_sizes: list[int] = []

    def init_head_bias(self, mean):
        with torch.no_grad():
            self.lin.bias.copy_(mean)

    def forward(self, batch):
        self.seen_sizes.append(int(batch["embedding"].shape[0]))
        c = batch["coords"].float()
        c = (c - c.mean(0)) / (c.std(0) + 1)
        return {"pred": self.lin(torch.cat([batch["embedding"], c], 1))}



@pytest.fixture(scope="module")
def prepared_once():
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=10, seed=1, n_patients=3)
    stpred.pp.select_genes(sdata, n_top=6)
    stpred.pp.normalize(sdata)
    return sdata


@pytest.fixture
def prepared(prepared_once):
    import spatialdata as sd

    sdata = sd.deepcopy(prepared_once)
    stpred.pp.extract_patches(sdata, size=32, context_size=None, progress=False)
    rng = np.random.default_rng(0)
    table = sdata.tables["stpred"]
    table.obsm["X_emb_toy"] = rng.normal(size=(table.n_obs, 5)).astype(np.float32)
    return sdata


FIT = {"max_epochs": 2, "progress": False}


def test_fit_predict_history_and_provenance(prepared, tmp_path):
    pred = stpred.tl.fit(prepared, "toy_cnn", train=["S0", "S1"], trainer_kwargs={"default_root_dir": tmp_path}, **FIT)
    assert isinstance(pred.history, pd.DataFrame)
    assert {"train_loss", "val_loss", "epoch"} <= set(pred.history.columns)
    assert len(pred.history) == 2
    # two patients among the training sections → one held out for validation, never S2 (not a training section)
    assert pred.info["validation"]["rule"] == "held-out patients"
    assert set(pred.info["validation"]["sections"]) <= {"S0", "S1"}
    stpred.tl.predict(prepared, "toy_cnn", progress=False)
    table = prepared.tables["stpred"]
    layer = table.layers["stpred_toy_cnn"]
    assert layer.shape == table.shape
    assert np.isfinite(layer).all()
    entry = table.uns["stpred"]["predictions"]["stpred_toy_cnn"]
    assert entry["genes"] == list(table.var_names)
    assert entry["checkpoint"].startswith(str(tmp_path))
    assert table.uns["stpred"]["models"]["toy_cnn"]["seed"] == 0
    # the model's augment hook ran with a training-progress value in [0, 1)
    assert pred.model.augment_calls
    assert 0 <= min(pred.model.augment_calls) < max(pred.model.augment_calls) < 1


def test_predict_refuses_to_overwrite(prepared):
    stpred.tl.fit(prepared, "toy_cnn", **FIT)
    stpred.tl.predict(prepared, "toy_cnn", progress=False)
    before = prepared.tables["stpred"].layers["stpred_toy_cnn"].copy()
    with pytest.raises(ValueError, match="already exists; pass `overwrite=True`"):
        stpred.tl.predict(prepared, "toy_cnn", progress=False)
    np.testing.assert_array_equal(prepared.tables["stpred"].layers["stpred_toy_cnn"], before)
    stpred.tl.predict(prepared, "toy_cnn", overwrite=True, sections=["S1"], progress=False)
    layer = prepared.tables["stpred"].layers["stpred_toy_cnn"]
    s1 = (prepared.tables["stpred"].obs["section"] == "S1").to_numpy()
    assert np.isfinite(layer[s1]).all()
    assert np.isnan(layer[~s1]).all()


def test_seeded_fit_is_deterministic_on_cpu(prepared):
    a = stpred.tl.fit(prepared, "toy_cnn", seed=3, **FIT).predict(prepared, progress=False)
    b = stpred.tl.fit(prepared, "toy_cnn", seed=3, **FIT).predict(prepared, progress=False)
    c = stpred.tl.fit(prepared, "toy_cnn", seed=4, **FIT).predict(prepared, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_save_load_round_trip(prepared, tmp_path):
    pred = stpred.tl.fit(prepared, "toy_cnn", **FIT)
    pred.save(tmp_path / "p")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pred.save(tmp_path / "p")
    loaded = stpred.tl.load(tmp_path / "p")
    np.testing.assert_array_equal(pred.predict(prepared, progress=False), loaded.predict(prepared, progress=False))
    pd.testing.assert_frame_equal(pred.history.reset_index(drop=True), loaded.history, check_dtype=False)
    stpred.tl.predict(prepared, tmp_path / "p", key_added="from_disk", progress=False)
    assert "from_disk" in prepared.tables["stpred"].layers


def test_load_refuses_other_genes_and_normalisation(prepared, tmp_path):
    pred = stpred.tl.fit(prepared, "toy_cnn", **FIT)
    pred.save(tmp_path / "p")
    loaded = stpred.tl.load(tmp_path / "p")
    stpred.pp.select_genes(prepared, n_top=5, overwrite=True)
    stpred.pp.normalize(prepared)
    with pytest.raises(ValueError, match="trained on 6 genes"):
        loaded.predict(prepared)
    stpred.pp.select_genes(prepared, n_top=6, overwrite=True)
    stpred.pp.normalize(prepared, method="log1p")
    with pytest.raises(ValueError, match="'log_share'-normalised targets"):
        loaded.predict(prepared)
    with pytest.raises(FileNotFoundError, match="No saved predictor"):
        stpred.tl.load(tmp_path / "nothing")


def test_errors_name_the_fix(prepared):
    with pytest.raises(ValueError, match=r"Unknown model 'hifuson'. Registered models: \["):
        stpred.tl.fit(prepared, "hifuson")
    with pytest.raises(KeyError, match=r"No fitted 'toy_cnn' model .* Run `stpred.tl.fit"):
        stpred.tl.predict(prepared, "toy_cnn")
    with pytest.raises(ValueError, match="Unknown section"):
        stpred.tl.fit(prepared, "toy_cnn", train=["S9"])
    with pytest.raises(KeyError, match="embedding"):
        stpred.tl.fit(prepared, "toy_slide", embedding_key="X_missing")


def test_missing_patches_error(prepared_once):
    import spatialdata as sd

    fresh = sd.deepcopy(prepared_once)
    with pytest.raises(KeyError, match=r"run `stpred.pp.extract_patches\(sdata\)` first"):
        stpred.tl.fit(fresh, "toy_cnn", **FIT)


def test_slide_batching_sees_whole_slides(prepared):
    pred = stpred.tl.fit(prepared, "toy_slide", embedding_key="X_emb_toy", train=["S0"], **FIT)
    # one section → spatial-block validation; each training step sees all training spots of the slide
    assert pred.info["validation"]["rule"] == "spatial blocks"
    n_train = pred.info["n_train_spots"]
    assert n_train in pred.model.seen_sizes
    stpred.tl.predict(prepared, "toy_slide", progress=False)
    assert np.isfinite(prepared.tables["stpred"].layers["stpred_toy_slide"]).all()


def test_validation_never_from_test_sections(prepared):
    table = prepared.tables["stpred"]
    train, val, info = validation_split(table, ["S0", "S1"], seed=0)
    assert info["rule"] == "held-out patients"
    assert set(train) | set(val) <= {"S0", "S1"}
    assert not set(train) & set(val)
    train, val, info = validation_split(table, ["S2"], seed=0)
    assert info["rule"] == "spatial blocks"
    rows = np.flatnonzero((table.obs["section"] == "S2").to_numpy())
    assert sorted(np.concatenate([train["S2"], val["S2"]])) == sorted(rows)
    # one block in each of the 5 equal-count x columns: validation spots span the section, not one strip
    x = table.obsm["spatial"][rows, 0]
    column = np.empty(len(rows), int)
    column[np.lexsort((table.obsm["spatial"][rows, 1], x))] = np.arange(len(rows)) * 5 // len(rows)
    assert set(column[np.isin(rows, val["S2"])]) == set(range(5))
    assert info["n_blocks"] == 5
    assert 0.1 < len(val["S2"]) / len(rows) < 0.35
    with pytest.raises(ValueError, match="also training sections"):
        validation_split(table, ["S0", "S1"], val=["S1"])


def test_protocol_splits():
    import anndata as ad

    obs = pd.DataFrame(
        {
            "section": ["A1", "A2", "A3", "B1", "B2", "C1", "D1", "E1", "E2"],
            "patient": ["A", "A", "A", "B", "B", "C", "D", "E", "E"],
        }
    )
    table = ad.AnnData(np.zeros((9, 2)), obs=obs.set_index(obs["section"].rename(None)))
    folds = slide_wise_folds(table, n_folds=2)
    for f in folds:
        train_p = {s[0] for s in f["train"]}
        test_p = {s[0] for s in f["test"]}
        assert not train_p & test_p
    assert [f["test_patients"] for f in folds] == [["A", "C", "E"], ["B", "D"]]
    with pytest.raises(ValueError, match="at least as many patients as folds"):
        slide_wise_folds(table, n_folds=6)
    ss = sample_specific_folds(table)
    assert [(f["train"], f["test"]) for f in ss] == [(["A1"], ["A2", "A3"]), (["B1"], ["B2"]), (["E1"], ["E2"])]


def test_cross_validate_writes_oof_and_baseline(prepared):
    res = stpred.tl.cross_validate(prepared, "toy_cnn", protocol="slide-wise", n_folds=3, **FIT)
    table = prepared.tables["stpred"]
    assert np.isfinite(table.layers["stpred_toy_cnn_cv"]).all()
    # the table has an embedding (X_emb_toy): the ridge baseline runs on the same folds beside the mean
    assert set(res.metrics["key"]) == {"stpred_toy_cnn_cv", "baseline_mean", "baseline_ridge"}
    assert res.protocol["gene_panel_includes_test_sections"] is True
    assert len(res.folds) == 3
    summary = res.summary()
    assert {"mse", "pcc_gene"} <= set(summary["metric"])
    with pytest.raises(ValueError, match="already exists"):
        stpred.tl.cross_validate(prepared, "toy_cnn", protocol="slide-wise", n_folds=3, **FIT)


def test_evaluate_matches_metrics(prepared):
    from stpred import metrics

    table = prepared.tables["stpred"]
    rng = np.random.default_rng(0)
    table.layers["noisy"] = (table.layers["target"] + rng.normal(0, 0.3, table.shape)).astype(np.float32)
    df = stpred.tl.evaluate(prepared, "noisy")
    assert set(df["section"]) == {"S0", "S1", "S2", "pooled", "mean_over_sections"}
    s1 = (table.obs["section"] == "S1").to_numpy()
    got = df[(df["section"] == "S1") & (df["metric"] == "pcc_gene")]["value"].item()
    assert got == pytest.approx(metrics.pcc_gene(table.layers["noisy"][s1], table.layers["target"][s1]))
    pooled = df[(df["section"] == "pooled") & (df["metric"] == "mse")]["value"].item()
    assert pooled == pytest.approx(float(np.mean((table.layers["noisy"] - table.layers["target"]) ** 2)), rel=1e-5)
    with pytest.raises(KeyError, match="Run `stpred.tl.predict"):
        stpred.tl.evaluate(prepared, "stpred_nothing")


def test_provenance_survives_zarr_round_trip(prepared, tmp_path):
    import spatialdata as sd

    stpred.tl.fit(prepared, "toy_cnn", **FIT)
    stpred.tl.predict(prepared, "toy_cnn", progress=False)
    stpred.tl.cross_validate(prepared, "toy_cnn", protocol="slide-wise", n_folds=3, **FIT)
    prepared.write(tmp_path / "x.zarr")
    back = sd.read_zarr(tmp_path / "x.zarr")
    table = back.tables["stpred"]
    np.testing.assert_array_equal(table.layers["stpred_toy_cnn"], prepared.tables["stpred"].layers["stpred_toy_cnn"])
    uns = table.uns["stpred"]
    assert list(uns["predictions"]["stpred_toy_cnn"]["genes"]) == list(table.var_names)
    assert uns["models"]["toy_cnn"]["checkpoint"]
    assert uns["cross_validation"]["stpred_toy_cnn_cv"]["protocol"]["name"] == "slide-wise"
    assert any(k.endswith("tl.predict") for k in uns["history"])
    # a predictor fitted earlier is found again through the recorded checkpoint after the round trip;
    # the patch bank lives in memory (or in a saved PatchBank), so it is cut again
    with pytest.raises(KeyError, match="extract_patches"):
        stpred.tl.predict(back, "toy_cnn", key_added="again", progress=False)
    stpred.pp.extract_patches(back, size=32, context_size=None, progress=False)
    stpred.tl.predict(back, "toy_cnn", key_added="again", progress=False)
    np.testing.assert_allclose(table.layers["again"], table.layers["stpred_toy_cnn"], rtol=1e-5, atol=1e-6)


def test_plain_makes_uns_writable():
    from stpred._provenance import plain

    out = plain({"a": [{"x": 1}, {"y": None}], "b": (1, 2.5), "c": None, "d": [1, "s"], "e": np.int64(3)})
    assert out == {"a": {"0": {"x": 1}, "1": {}}, "b": [1, 2.5], "d": {"0": 1, "1": "s"}, "e": 3}


def test_predict_returns_table_order_whatever_the_section_order(prepared):
    pred = stpred.tl.fit(prepared, "toy_cnn", **FIT)
    full = pred.predict(prepared, progress=False)
    sections = prepared.tables["stpred"].obs["section"].astype(str).to_numpy()
    rows = np.isin(sections, ["S0", "S2"])
    np.testing.assert_allclose(pred.predict(prepared, ["S2", "S0"], progress=False), full[rows], rtol=1e-6, atol=1e-6)
