"""A new model needs one StpredModel subclass and one registration: fit, predict, save and load then just work."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import stpred
from stpred.models import StpredModel, TrainDefaults, register_model, unregister_model
from stpred.train._data import IndexDataModule


# ------------------------------------------------------------------------------------ the fourth model (one class)
@dataclass(frozen=True)
class MeanColourConfig:
    n_genes: int
    spot_size: int = 32
    train: TrainDefaults = field(default_factory=lambda: TrainDefaults(lr=1e-2, max_epochs=2, batch_size=8))


class MeanColour(StpredModel):
    """Linear map from the mean colour of the spot crop; records the sections of every training batch."""

    inputs = ("spot", "slide")

    def __init__(self, n_genes: int, **options) -> None:
        super().__init__()
        self.config = MeanColourConfig(n_genes, **options)
        self.head = nn.Linear(3, n_genes)
        self.batch_sections: list[set[int]] = []

    @property
    def crop_sizes(self):
        return self.config.spot_size, None

    def augment(self, batch, progress):
        self.batch_sections.append(set(batch["slide"].tolist()))
        return batch

    def forward(self, batch):
        return {"pred": self.head(batch["spot"].float().mean((2, 3)) / 255.0)}


# ------------------------------------------------------------------- a closed-form model (no gradient descent)
@dataclass(frozen=True)
class ColourRidgeConfig:
    n_genes: int
    alpha: float = 1.0
    train: TrainDefaults = field(default_factory=TrainDefaults)


class ColourRidge(StpredModel):
    """Ridge regression of the target on the mean colour, solved in closed form."""

    inputs = ("spot",)
    trainable = False

    def __init__(self, n_genes: int, **options) -> None:
        super().__init__()
        self.config = ColourRidgeConfig(n_genes, **options)
        self.register_buffer("weight", torch.zeros(4, n_genes))

    @staticmethod
    def _features(spot: torch.Tensor) -> torch.Tensor:
        x = spot.float().mean((2, 3)) / 255.0
        return torch.cat([x, torch.ones(len(x), 1)], dim=1)

    def fit_closed_form(self, store, train_groups, val_groups):
        rows = torch.from_numpy(np.concatenate(train_groups))
        batch = store.gather(rows)
        x, y = self._features(batch["spot"]), batch["target"].float()
        gram = x.T @ x + self.config.alpha * torch.eye(x.shape[1])
        self.weight.copy_(torch.linalg.solve(gram, x.T @ y))
        out = {"train_mse": float(((x @ self.weight - y) ** 2).mean())}
        if val_groups:
            val = store.gather(torch.from_numpy(np.concatenate(val_groups)))
            out["val_mse"] = float(((self._features(val["spot"]) @ self.weight - val["target"]) ** 2).mean())
        return out

    def forward(self, batch):
        return {"pred": self._features(batch["spot"]) @ self.weight}


@pytest.fixture
def registered():
    names = {"contract_mean_colour": MeanColour, "contract_colour_ridge": ColourRidge}
    for name, cls in names.items():
        register_model(name)(cls)
    yield names
    for name in names:
        unregister_model(name)


@pytest.fixture(scope="module")
def sdata():
    data = stpred.datasets.synthetic(n_sections=3, n_genes=10, seed=1, n_patients=3)
    stpred.pp.select_genes(data, n_top=6)
    stpred.pp.normalize(data)
    stpred.pp.extract_patches(data, size=32, context_size=None, progress=False)
    return data


FIT = {"train": ["S0", "S1"], "progress": False}


@pytest.mark.parametrize("name", ["contract_mean_colour", "contract_colour_ridge"])
def test_new_model_fits_predicts_saves_and_loads(registered, sdata, tmp_path, name):
    predictor = stpred.tl.fit(sdata, name, trainer_kwargs={"default_root_dir": tmp_path}, **FIT)
    assert isinstance(predictor.model, registered[name])
    assert np.isfinite(predictor.history["val_mse"]).all()
    stpred.tl.predict(sdata, name, progress=False)
    table = sdata.tables["stpred"]
    layer = table.layers[f"stpred_{name}"]
    assert layer.shape == table.shape
    assert np.isfinite(layer).all()
    predictor.save(tmp_path / "saved")
    loaded = stpred.tl.load(tmp_path / "saved")
    np.testing.assert_array_equal(loaded.predict(sdata, progress=False), layer)
    assert table.uns["stpred"]["models"][name]["checkpoint"].startswith(str(tmp_path))


def test_closed_form_model_matches_least_squares(registered, sdata):
    predictor = stpred.tl.fit(sdata, "contract_colour_ridge", val=False, alpha=1e-8, **FIT)
    table = sdata.tables["stpred"]
    rows = np.isin(table.obs["section"].astype(str), ["S0", "S1"])
    store_x = ColourRidge._features(torch.from_numpy(sdata_spots(sdata)[rows])).numpy()
    expected, *_ = np.linalg.lstsq(store_x, table.layers["target"][rows], rcond=None)
    fitted = store_x @ predictor.model.weight.numpy()
    np.testing.assert_allclose(fitted, store_x @ expected, atol=1e-3)  # float32 solve vs float64 lstsq
    assert list(predictor.history.columns) == ["phase", "epoch", "train_mse"]


def sdata_spots(data) -> np.ndarray:
    from stpred.pp._patches import get_patch_bank

    return np.asarray(get_patch_bank(data, size=32, context_size=None).spot)


@pytest.mark.parametrize("per_section", [True, False])
def test_batch_per_section_plan_option(registered, sdata, per_section):
    predictor = stpred.tl.fit(
        sdata, "contract_mean_colour", plan_kwargs={"batch_per_section": per_section}, val=False, **FIT
    )
    sections = predictor.model.batch_sections
    assert len(sections) > 4
    if per_section:
        assert all(len(s) == 1 for s in sections)
    else:
        assert any(len(s) > 1 for s in sections)
    assert predictor.info["optim"]["batch_per_section"] is per_section


def test_hifusion_batches_one_section_by_default():
    from stpred.models import HiFusion

    plan = HiFusion.tiny(5).config.train
    assert plan.batch_per_section is True
    groups = [np.arange(0, 40), np.arange(40, 70), np.arange(70, 100)]
    section = np.repeat([0, 1, 2], [40, 30, 30])
    for per_section, one_section in ((plan.batch_per_section, True), (False, False)):
        data = IndexDataModule(groups, batch_size=plan.batch_size // 4, seed=0, batch_per_section=per_section)
        batches = [b["index"].numpy() for b in data.train_dataloader()]
        assert sorted(np.concatenate(batches).tolist()) == list(range(100))  # every spot once per epoch
        assert all(len(set(section[b])) == 1 for b in batches) is one_section


def test_register_refuses_non_models():
    class NotAModel(nn.Module):
        pass

    with pytest.raises(TypeError, match="subclass `stpred.models.StpredModel`"):
        register_model("not_a_model")(NotAModel)
    with pytest.raises(TypeError, match="unknown batch keys"):

        class BadInputs(StpredModel):
            inputs = ("pixels",)


def test_unknown_model_lists_builtins_in_a_fresh_process():
    code = "import stpred\ntry:\n    stpred.models.get_model('nope')\nexcept ValueError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Unknown model 'nope'" in out
    assert "'hifusion', 'hist', 'mean', 'mmap', 'ridge'" in out


def test_fit_accepts_numpy_ints_and_user_callbacks(registered, sdata):
    import lightning as L

    class CountEpochs(L.Callback):
        def __init__(self) -> None:
            self.n = 0

        def on_train_epoch_end(self, trainer, module) -> None:
            self.n += 1

    counter = CountEpochs()
    predictor = stpred.tl.fit(
        sdata,
        "contract_mean_colour",
        max_epochs=np.int64(3),
        batch_size=np.int32(16),
        trainer_kwargs={"callbacks": [counter]},
        **FIT,
    )
    assert counter.n == 3
    assert predictor.info["max_epochs"] == 3
    assert type(predictor.info["batch_size"]) is int
    assert len(predictor.history) == 3
