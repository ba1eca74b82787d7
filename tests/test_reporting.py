"""Honest reporting: evaluate warns when scored sections trained the model; stpred writes strict JSON only."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import stpred
from stpred.models import StpredModel, register_model
from stpred.tl import Predictor


@register_model("toy_reporting")
class _ToyEmbedding(StpredModel):
    inputs = ("embedding",)
    batching = "spots"
    data_sizes = ("in_dim", "n_genes")

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_dim=in_dim, n_genes=n_genes)
        self.lin = nn.Linear(in_dim, n_genes)

    def forward(self, batch):
        return {"pred": self.lin(batch["embedding"].float())}


@pytest.fixture
def predicted(sdata):
    """Two sections; a predictor that trained on S0 and chose its epoch on held-out patient sections ['S1']."""
    stpred.pp.select_genes(sdata, n_top=4)
    stpred.pp.normalize(sdata)
    table = sdata.tables["stpred"]
    table.obsm["X_emb"] = np.random.default_rng(0).normal(size=(table.n_obs, 3)).astype(np.float32)
    torch.manual_seed(0)
    predictor = Predictor(
        _ToyEmbedding(3, 4),
        name="toy_reporting",
        genes=list(table.var_names),
        normalize=dict(table.uns["stpred"]["normalize"]),
        sizes={"in_dim": 3, "n_genes": 4},
        model_kwargs={},
        info={
            "train_sections": ["S0"],
            "validation": {"rule": "held-out patients", "sections": ["S1"]},
            "embedding_key": "X_emb",
        },
    )
    stpred.tl.predict(sdata, predictor, progress=False)
    return sdata


def test_predict_records_which_model_and_sections_wrote_the_layer(predicted):
    entry = predicted.tables["stpred"].uns["stpred"]["predictions"]["stpred_toy_reporting"]
    assert entry["model"] == "toy_reporting"
    assert list(entry["train_sections"]) == ["S0"]
    assert list(entry["validation"]["sections"]) == ["S1"]


def test_evaluate_warns_on_training_and_validation_sections(predicted):
    sections = list(dict.fromkeys(predicted.tables["stpred"].obs["section"].astype(str)))
    assert sections == ["S0", "S1"]
    with pytest.warns(UserWarning, match=r"model 'toy_reporting', which trained on \['S0'\] and chose its best epoch"):
        stpred.tl.evaluate(predicted, "stpred_toy_reporting")
    with pytest.warns(UserWarning, match=r"which trained on \['S0'\]; scores of those sections are optimistic"):
        stpred.tl.evaluate(predicted, "stpred_toy_reporting", sections=["S0"])
    with pytest.warns(UserWarning, match=r"which chose its best epoch on \['S1'\]"):
        stpred.tl.evaluate(predicted, "stpred_toy_reporting", sections=["S1"])


def test_evaluate_is_silent_on_held_out_sections_and_unrecorded_layers(predicted):
    table = predicted.tables["stpred"]
    table.uns["stpred"]["predictions"]["stpred_toy_reporting"]["validation"] = {"rule": "none"}
    table.layers["copy"] = table.layers["stpred_toy_reporting"].copy()
    s1 = (table.obs["section"] == "S1").to_numpy()
    table.layers["copy"][~s1] = np.nan  # a layer with predictions on S1 only, written without tl.predict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stpred.tl.evaluate(predicted, "stpred_toy_reporting", sections=["S1"])
        stpred.tl.evaluate(predicted, "copy")


def _strict_loads(text: str):
    def refuse(constant: str):
        pytest.fail(f"non-strict JSON constant {constant!r} in {text!r}")

    return json.loads(text, parse_constant=refuse)


def test_demo_summary_is_strict_json(tmp_path):
    from stpred.__main__ import _summary, write_summary

    # the demo's training-mean baseline is constant per gene: its pcc_gene is NaN
    rows = [
        ("stpred_hifusion", "mse", 0.5),
        ("stpred_hifusion", "pcc_gene", 0.3),
        ("baseline_mean", "mse", 0.7),
        ("baseline_mean", "pcc_gene", np.nan),
    ]
    scores = pd.DataFrame([{"key": k, "metric": m, "value": v, "section": "pooled"} for k, m, v in rows])
    summary = _summary(scores, seconds=1.23)
    assert np.isnan(summary["baseline_pcc_gene"])
    path = write_summary(tmp_path / "summary.json", summary)
    assert _strict_loads(path.read_text()) == {
        "hifusion_mse": 0.5,
        "baseline_mse": 0.7,
        "hifusion_pcc_gene": 0.3,
        "baseline_pcc_gene": None,
        "seconds": 1.2,
    }


def test_json_helper_converts_every_non_finite_value(tmp_path):
    from stpred._provenance import dumps_json, write_json

    value = {"a": float("inf"), "b": [np.float32("nan"), -np.inf, 1], "c": np.array([1.0, np.nan]), "d": (np.int64(2),)}
    expected = {"a": None, "b": [None, None, 1], "c": [1.0, None], "d": [2]}
    assert _strict_loads(dumps_json(value)) == expected
    assert _strict_loads(write_json(tmp_path / "x.json", value).read_text()) == expected


def test_every_json_write_in_stpred_goes_through_the_strict_helper():
    from pathlib import Path

    root = Path(stpred.__file__).parent
    offenders = []
    for file in root.rglob("*.py"):
        name = file.relative_to(root).as_posix()
        if name == "pp/_embed.py":
            continue  # hashes a cache key with json.dumps; never written to disk as JSON
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if ("json.dump(" in line or "json.dumps(" in line) and "allow_nan=False" not in line:
                offenders.append(f"{name}:{number}")
    assert offenders == [], f"write JSON with stpred._provenance.write_json / dumps_json: {offenders}"
