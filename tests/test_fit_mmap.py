"""MMAP through the public API: both phases, beats the training-mean baseline, save/load keeps adapters and bank."""

from __future__ import annotations

import numpy as np
import pytest

import stpred

# the tiny test backbone is random on purpose (tests/test_mmap.py checks the warning)
pytestmark = pytest.mark.filterwarnings("ignore::stpred.models.mmap.RandomBackboneWarning")

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = {
    "backbone": "vit",
    "backbone_kwargs": VIT,
    "lora_blocks": 2,
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "attn_heads": 2,
    "attn_dim_head": 16,
    "proto_k_min": 4,
    "proto_k_max": 16,
}


@pytest.fixture(scope="module")
def fitted():
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=30, seed=2, n_patients=1)
    stpred.pp.select_genes(sdata, n_top=20, sections=["S0", "S1"])
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=64, context_size=None, progress=False)
    predictor = stpred.tl.fit(
        sdata, "mmap", train=["S0", "S1"], max_epochs=15, lr=1e-3, batch_size=16, progress=False, **TINY
    )
    stpred.tl.predict(sdata, "mmap", sections=["S2"], progress=False)
    return sdata, predictor


def test_both_phases_run_and_beat_training_mean(fitted, against_training_mean):
    sdata, predictor = fitted
    assert sorted(predictor.history["phase"].unique()) == [1, 2]
    assert set(predictor.info["best"]) == {1, 2}
    assert predictor.model.phase == 2
    value, baseline = against_training_mean(sdata, "stpred_mmap", train=["S0", "S1"], test=["S2"])
    assert value["mse"] < 0.9 * baseline["mse"]
    assert value["pcc_gene"] > 0.25


def test_save_load_keeps_adapters_and_prototype_recipe(fitted, tmp_path):
    sdata, predictor = fitted
    predictor.save(tmp_path / "mmap")
    loaded = stpred.tl.load(tmp_path / "mmap")
    assert loaded.model.phase == 2
    lora = {k for k in loaded.model.state_dict() if "lora" in k}
    assert lora
    for key in lora:
        np.testing.assert_array_equal(loaded.model.state_dict()[key].numpy(), predictor.model.state_dict()[key].numpy())
    assert loaded.model.config.proto_k_min == 4
    assert loaded.model.config.proto_k_max == 16
    # prototypes are rebuilt per slide at prediction time, from the same features → identical predictions
    np.testing.assert_allclose(
        loaded.predict(sdata, ["S2"], progress=False), predictor.predict(sdata, ["S2"], progress=False), atol=1e-5
    )


def test_phase_one_only(fitted):
    sdata, _ = fitted
    predictor = stpred.tl.fit(sdata, "mmap", max_epochs=1, progress=False, phase=1, **TINY)
    assert sorted(predictor.history["phase"].unique()) == [1]
    assert predictor.model.phase == 1
