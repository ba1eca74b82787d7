"""Named presets: every built-in model has "cpu" and "paper"; fit's own arguments override a preset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from torch import nn

import stpred
from stpred.models import Preset, StpredModel, TrainDefaults, get_preset, register_model, unregister_model


@pytest.mark.parametrize("name", ["hifusion", "hist", "mmap", "mean", "ridge"])
def test_builtin_presets_build(name):
    cls = stpred.models.get_model(name)
    for preset in ("cpu", "paper"):
        p = get_preset(name, preset)
        sizes = {"n_genes": 5, "in_dim": 8}
        if name in ("hifusion", "mmap", "hist") and preset == "paper":
            continue  # the paper configurations are the models' defaults (slow to build here)
        model = cls.from_sizes(sizes, **p.model)
        TrainDefaults(**{**vars(model.config.train), **p.train})
        if p.patches:
            crop = model.crop_sizes[0]
            assert crop is None or crop == p.patches["size"]
    with pytest.raises(ValueError, match="Unknown preset 'gpu'"):
        get_preset(name, "gpu")


@dataclass(frozen=True)
class _Config:
    n_genes: int
    in_dim: int
    hidden: int = 2
    train: TrainDefaults = field(default_factory=lambda: TrainDefaults(max_epochs=5, lr=1e-3))


class _Probe(StpredModel):
    inputs = ("embedding",)
    data_sizes = ("n_genes", "in_dim")
    presets = {"fast": Preset(model={"hidden": 3}, train={"max_epochs": 2, "lr": 5e-3, "weight_decay": 0.0})}

    def __init__(self, in_dim, n_genes, **options):
        super().__init__()
        self.config = _Config(n_genes=n_genes, in_dim=in_dim, **options)
        self.head = nn.Sequential(nn.Linear(in_dim, self.config.hidden), nn.Linear(self.config.hidden, n_genes))

    def forward(self, batch):
        return {"pred": self.head(batch["embedding"])}


def test_fit_applies_a_preset_under_the_callers_arguments(tmp_path):
    register_model("preset_probe")(_Probe)
    try:
        data = stpred.datasets.synthetic(n_sections=2, n_genes=8, seed=0, grid=6)
        stpred.pp.select_genes(data, n_top=4)
        stpred.pp.normalize(data)
        table = data.tables["stpred"]
        table.obsm["X_emb_p"] = np.random.default_rng(0).normal(size=(table.n_obs, 3)).astype(np.float32)
        fit = {"train": ["S0"], "embedding_key": "X_emb_p", "progress": False}
        pred = stpred.tl.fit(data, "preset_probe", preset="fast", **fit)
        assert pred.model.config.hidden == 3
        assert pred.info["max_epochs"] == 2
        assert pred.info["optim"]["lr"] == 5e-3
        assert pred.info["optim"]["weight_decay"] == 0.0
        assert pred.info["preset"] == "fast"
        pred = stpred.tl.fit(data, "preset_probe", preset="fast", max_epochs=1, hidden=4, **fit)
        assert pred.model.config.hidden == 4
        assert pred.info["max_epochs"] == 1
        pred.save(tmp_path / "p")
        assert stpred.tl.load(tmp_path / "p").model.config.hidden == 4
    finally:
        unregister_model("preset_probe")
