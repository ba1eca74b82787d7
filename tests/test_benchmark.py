"""tl.benchmark: a named protocol whose test sections reach nothing but the final scoring."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import stpred
from stpred.models import StpredModel, TrainDefaults, register_model, unregister_model
from stpred.tl._benchmark import check_no_leak, strict_json

EMB = "X_emb_test"


@dataclass(frozen=True)
class EmbMLPConfig:
    n_genes: int
    in_dim: int
    train: TrainDefaults = field(
        default_factory=lambda: TrainDefaults(lr=1e-2, max_epochs=3, batch_size=32, early_stopping_patience=1)
    )


class EmbMLP(StpredModel):
    """A tiny trainable model on embeddings (validation and early stopping take part)."""

    inputs = ("embedding",)
    data_sizes = ("n_genes", "in_dim")

    def __init__(self, in_dim: int, n_genes: int, **options) -> None:
        super().__init__()
        self.config = EmbMLPConfig(n_genes=n_genes, in_dim=in_dim, **options)
        self.head = nn.Linear(in_dim, n_genes)

    def forward(self, batch):
        return {"pred": self.head(batch["embedding"])}


@pytest.fixture
def registered():
    register_model("bench_mlp")(EmbMLP)
    yield "bench_mlp"
    unregister_model("bench_mlp")


def _data(sections=None):
    data = stpred.datasets.synthetic(n_sections=4, n_genes=12, seed=2, n_patients=2, grid=8)
    stpred.pp.select_genes(data, n_top=6, sections=sections)
    stpred.pp.normalize(data)
    table = data.tables["stpred"]
    morph = np.asarray(data.tables["table"].obsm["morphology"], dtype=np.float32)
    noise = np.random.default_rng(0).normal(size=(table.n_obs, 3)).astype(np.float32)
    table.obsm[EMB] = np.concatenate([morph, noise], axis=1)
    return data


class _Spy:
    """Records what every gene selection and every training run saw, as section names."""

    def __init__(self, monkeypatch):
        import stpred.pp
        import stpred.train

        self.selected: list[list[str]] = []
        self.runs: list[dict[str, set[str]]] = []
        real_select, real_runner = stpred.pp.select_genes, stpred.train.TrainRunner
        spy = self

        def select(sdata, **kwargs):
            spy.selected.append(list(kwargs.get("sections") or ["<all>"]))
            return real_select(sdata, **kwargs)

        class Runner(real_runner):
            def run(self):
                sec = self._sections
                target = self.store.tensors["target"]
                spy.runs.append(
                    {
                        "train": set(sec[np.concatenate(self.train_groups)]),
                        "val": set(sec[np.concatenate(self.val_groups)]) if self.val_groups else set(),
                        "targets": set(sec[torch.isfinite(target).all(1).numpy()]),
                    }
                )
                return super().run()

        monkeypatch.setattr(stpred.pp, "select_genes", select)
        monkeypatch.setattr(stpred.train, "TrainRunner", Runner)
        self.runner = Runner


@pytest.mark.parametrize("protocol", ["sample-specific", "leave-one-patient-out"])
def test_no_test_section_reaches_selection_statistics_validation_or_training(
    registered, monkeypatch, tmp_path, protocol
):
    data = _data()  # panel chosen on all sections: the benchmark must re-select it per fold
    sections = data.tables["stpred"].obs["section"].astype(str).to_numpy()
    spy = _Spy(monkeypatch)
    spy.runner._sections = sections
    result = stpred.tl.benchmark(
        data,
        ["mean", "ridge", registered],
        protocol=protocol,
        seeds=(0, 1),
        embedding_key=EMB,
        n_boot=20,
        path=tmp_path / "bench.json",
    )
    folds = result.protocol["folds"]
    assert len(spy.selected) == len(folds)
    assert len(spy.runs) == len(folds) * 2 * 3
    runs = iter(spy.runs)
    for fold, chosen in zip(folds, spy.selected, strict=True):
        assert fold["genes"]["plan"] == "reselect"
        assert set(chosen) == set(fold["train"])  # gene selection saw the training sections only
        for _ in range(6):
            run = next(runs)
            assert run["train"] | run["val"] <= set(fold["train"])  # training, validation, early stopping
            assert run["targets"] <= set(fold["train"])  # the store holds no test target (head bias, statistics)
    assert "bench_mlp/seed1" in folds[0]["validation"]


def test_benchmark_table_summary_uns_and_strict_json(registered, tmp_path):
    data = _data(sections=["S0", "S2"])  # the first section of each patient: sample-specific keeps the panel
    result = stpred.tl.benchmark(
        data,
        {"mean": {}, "ridge": {"n_components": 4}, registered: {"max_epochs": 2}},
        seeds=(0, 1),
        embedding_key=EMB,
        n_boot=20,
        path=tmp_path / "bench.json",
    )
    scores = result.scores
    for col in ("protocol", "model", "seed", "fold", "section", "metric", "value", "comparator", "ci_low_genes"):
        assert col in scores
    assert {f["genes"]["plan"] for f in result.protocol["folds"]} == {"keep"}
    assert set(scores["section"]) == {"S1", "S3", "mean_over_sections", "pooled"}
    diffs = scores[scores["metric"] == "pcc_gene_diff"]
    assert set(zip(diffs["model"], diffs["comparator"])) == {("ridge", "mean"), (registered, "mean"), (registered, "ridge")}
    summary = result.summary()
    row = summary.query("model == 'ridge' and metric == 'pcc_gene'").iloc[0]
    assert row["n_seeds"] == 2
    assert np.isfinite(row["pooled"])
    per_seed = scores.query("model == 'ridge' and metric == 'pcc_gene' and section in ['S1', 'S3']")
    assert row["mean"] == pytest.approx(per_seed.groupby("seed")["value"].mean().mean())
    text = (tmp_path / "bench.json").read_text()
    body = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert body["protocol"]["status"] == "complete"
    assert len(body["scores"]) == len(scores)
    assert any(r["value"] is None for r in body["scores"] if r["model"] == "mean" and r["metric"] == "pcc_gene")
    stored = data.tables["stpred"].uns["stpred"]["benchmark"]["benchmark"]
    assert len(stored["scores"]["value"]) == len(scores)
    assert "_stpred_benchmark_fold" not in data.tables


def test_benchmark_refuses_leaky_panels_and_splits():
    data = _data()
    with pytest.raises(ValueError, match="include test sections"):
        stpred.tl.benchmark(data, ["mean"], reselect_genes=False, seeds=(0,), n_boot=20)
    assert "benchmark" not in data.tables["stpred"].uns["stpred"]
    with pytest.raises(TypeError, match="set by the protocol"):
        stpred.tl.benchmark(data, ["mean"], train=["S0"])
    patients = {"S0": "P0", "S1": "P0", "S2": "P1"}
    with pytest.raises(ValueError, match="patient"):
        check_no_leak({"fold": 0, "train": ["S0"], "test": ["S1", "S2"]}, "slide-wise", patients)
    with pytest.raises(ValueError, match="both the training and the test"):
        check_no_leak({"fold": 0, "train": ["S0"], "test": ["S0"]}, "sample-specific", patients)


def test_fit_store_holds_no_test_targets(monkeypatch):
    data = _data()
    sections = data.tables["stpred"].obs["section"].astype(str).to_numpy()
    spy = _Spy(monkeypatch)
    spy.runner._sections = sections
    stpred.tl.fit(data, "ridge", train=["S0", "S2"], embedding_key=EMB, progress=False)
    assert spy.runs[0]["targets"] == {"S0", "S2"}


def test_strict_json_replaces_non_finite():
    assert strict_json({"a": [1.0, float("nan"), np.float32("inf")], "b": np.int64(3)}) == {"a": [1.0, None, None], "b": 3}
