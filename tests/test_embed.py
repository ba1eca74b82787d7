"""Tests of ``stpred.pp.embed``: results are compared with direct forwards of independently built encoders."""

from __future__ import annotations

import hashlib
import importlib.machinery
import sys
import types
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpred
from stpred._provenance import plain
from stpred.models.encoders.resnet import ResNet, resnet18
from stpred.models.encoders.vit import create_vit, from_checkpoint
from stpred.pp._patches import get_patch_bank

if TYPE_CHECKING:
    from spatialdata import SpatialData

SIZE = 32
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
QUIET = {"progress": False, "device": "cpu", "batch_size": 100}  # 100: several batches, the last one partial


def _prepare(sdata: SpatialData) -> SpatialData:
    stpred.pp.select_genes(sdata, n_top=4)
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=SIZE, context_size=None, progress=False)
    return sdata


@pytest.fixture
def prepared(sdata: SpatialData) -> SpatialData:
    return _prepare(sdata)


def _table(sdata: SpatialData):
    return sdata.tables["stpred"]


def _crops(sdata: SpatialData) -> torch.Tensor:
    return torch.from_numpy(get_patch_bank(sdata).spot.copy())


def _imagenet(crops: torch.Tensor) -> torch.Tensor:
    return (crops.float() / 255 - MEAN) / STD


class MeanPool(nn.Module):
    """Channel means times a learnable scale; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mean((-2, -1)) * self.scale


class Returns(nn.Module):
    """Returns ``fn(x)``: a module with a wrong output."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(x)


# ---------------------------------------------------------------------------------------------------------------------
# results


def test_resnet_random_init_is_seeded_and_matches_direct_forward(prepared, request):
    import spatialdata

    rng_before = torch.random.get_rng_state()
    stpred.pp.embed(prepared, encoder="resnet18", width=4, **QUIET)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's random state is left alone
    table = _table(prepared)
    emb = table.obsm["X_emb_resnet18"]
    assert emb.dtype == np.float32
    assert emb.shape == (table.n_obs, 32)

    # a second, fresh object gives the identical array
    other = _prepare(spatialdata.deepcopy(request.getfixturevalue("_sdata_once")))
    stpred.pp.embed(other, encoder="resnet18", width=4, **QUIET)
    np.testing.assert_array_equal(_table(other).obsm["X_emb_resnet18"], emb)

    # independent computation: the same seeded ResNet on ImageNet-normalised crops, in table order
    torch.manual_seed(0)
    net = resnet18(width=4).eval()
    with torch.no_grad():
        expected = net(_imagenet(_crops(prepared))).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)

    entry = table.uns["stpred"]["embeddings"]["X_emb_resnet18"]
    assert entry["encoder"] == "resnet18"
    assert entry["seed"] == 0
    assert entry["size"] == SIZE
    assert entry["dim"] == 32
    assert entry["encoder_kwargs"] == {"width": 4}
    assert len(entry["weights_sha256"]) == 64
    history = table.uns["stpred"]["history"]
    assert any(h["step"] == "embed" for h in history.values())


def test_other_seed_gives_other_embedding(prepared):
    stpred.pp.embed(prepared, encoder="resnet10", width=4, seed=0, key_added="X_emb_a", **QUIET)
    stpred.pp.embed(prepared, encoder="resnet10", width=4, seed=1, key_added="X_emb_b", **QUIET)
    obsm = _table(prepared).obsm
    assert not np.allclose(obsm["X_emb_a"], obsm["X_emb_b"])
    entries = _table(prepared).uns["stpred"]["embeddings"]
    assert entries["X_emb_a"]["weights_sha256"] != entries["X_emb_b"]["weights_sha256"]


def test_cached_second_call_does_not_recompute(prepared, monkeypatch):
    calls = []
    forward = ResNet.forward

    def counting(self, x):
        calls.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(ResNet, "forward", counting)
    stpred.pp.embed(prepared, encoder="resnet18", width=4, **QUIET)
    n_calls = len(calls)
    assert sum(calls) == _table(prepared).n_obs
    assert n_calls == -(-_table(prepared).n_obs // QUIET["batch_size"])
    first = _table(prepared).obsm["X_emb_resnet18"]

    stpred.pp.embed(prepared, encoder="resnet18", width=4, **QUIET)  # same recipe: reused
    assert len(calls) == n_calls
    assert _table(prepared).obsm["X_emb_resnet18"] is first

    # a different recipe under the same key is refused ...
    with pytest.raises(ValueError, match=r"obsm\['X_emb_resnet18'\] holds embeddings made with .*overwrite=True"):
        stpred.pp.embed(prepared, encoder="resnet18", width=4, normalize="standardize", **QUIET)
    with pytest.raises(ValueError, match="overwrite=True"):
        stpred.pp.embed(prepared, encoder="resnet18", width=4, seed=3, **QUIET)
    assert len(calls) == n_calls
    # ... unless overwrite=True, which always recomputes
    stpred.pp.embed(prepared, encoder="resnet18", width=4, normalize="standardize", overwrite=True, **QUIET)
    assert len(calls) == 2 * n_calls
    entry = _table(prepared).uns["stpred"]["embeddings"]["X_emb_resnet18"]
    assert entry["normalize"] == "standardize"
    assert not np.allclose(_table(prepared).obsm["X_emb_resnet18"], first)
    stpred.pp.embed(prepared, encoder="resnet18", width=4, normalize="standardize", overwrite=True, **QUIET)
    assert len(calls) == 3 * n_calls


def test_cache_survives_file_round_trip(prepared, tmp_path, monkeypatch):
    import anndata as ad

    stpred.pp.embed(prepared, encoder="resnet10", width=4, **QUIET)
    table = _table(prepared)
    table.write_h5ad(tmp_path / "stpred.h5ad")
    back = ad.read_h5ad(tmp_path / "stpred.h5ad")
    assert plain(back.uns["stpred"]["embeddings"]) == table.uns["stpred"]["embeddings"]
    # what a re-read SpatialData would hold (lists come back as numpy arrays)
    table.uns["stpred"] = back.uns["stpred"]
    table.obsm["X_emb_resnet10"] = back.obsm["X_emb_resnet10"]

    def fail(self, x):
        msg = "recomputed"
        raise AssertionError(msg)

    monkeypatch.setattr(ResNet, "forward", fail)
    stpred.pp.embed(prepared, encoder="resnet10", width=4, **QUIET)  # reused from the re-read table


def test_user_module_normalisations_and_state_restored(prepared):
    crops = _crops(prepared).double()
    module = MeanPool().train()
    stpred.pp.embed(prepared, encoder=module, **QUIET)
    assert module.training  # restored after the call
    table = _table(prepared)
    expected = ((crops / 255 - MEAN.double()) / STD.double()).mean((-2, -1)).numpy()
    np.testing.assert_allclose(table.obsm["X_emb_MeanPool"], expected, rtol=1e-5, atol=1e-5)

    calls = module.calls
    stpred.pp.embed(prepared, encoder=module, **QUIET)  # same class, same state: cached
    assert module.calls == calls

    stpred.pp.embed(prepared, encoder=module, normalize="none", key_added="X_emb_unit", **QUIET)
    np.testing.assert_allclose(table.obsm["X_emb_unit"], (crops / 255).mean((-2, -1)).numpy(), rtol=1e-5, atol=1e-6)
    stpred.pp.embed(prepared, encoder=module, normalize="standardize", key_added="X_emb_std", **QUIET)
    np.testing.assert_allclose(table.obsm["X_emb_std"], 0.0, atol=1e-4)

    with torch.no_grad():
        module.scale.mul_(2.0)  # other weights: another checksum
    with pytest.raises(ValueError, match="overwrite=True"):
        stpred.pp.embed(prepared, encoder=module, **QUIET)
    stpred.pp.embed(prepared, encoder=module, overwrite=True, **QUIET)
    np.testing.assert_allclose(table.obsm["X_emb_MeanPool"], 2 * expected, rtol=1e-5, atol=1e-5)
    assert "seed" not in table.uns["stpred"]["embeddings"]["X_emb_MeanPool"]


def test_vit_random_init_resizes_to_its_input_size(prepared):
    # img_size 16 < crop 32: the crops are resized on the device (antialiased bilinear) before the forward
    stpred.pp.embed(prepared, encoder="vit_tiny_patch16_224", img_size=16, seed=5, **TINY_VIT, **QUIET)
    emb = _table(prepared).obsm["X_emb_vit_tiny"]
    torch.manual_seed(5)
    vit = create_vit("vit_tiny", img_size=16, **TINY_VIT).eval()
    x = F.interpolate(_crops(prepared).float(), size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        expected = vit((x / 255 - MEAN) / STD).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    assert _table(prepared).uns["stpred"]["embeddings"]["X_emb_vit_tiny"]["input_size"] == [16, 16]


def test_uni_checkpoint_with_layerscale_loads_and_matches_from_checkpoint(prepared, tmp_path):
    torch.manual_seed(1)
    source = create_vit("vit", img_size=SIZE, init_values=1e-5, **TINY_VIT)
    with torch.no_grad():
        for block in source.blocks:  # trained-looking LayerScale, so that `ls*.gamma` matter
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    state = source.state_dict()
    assert "blocks.0.ls1.gamma" in state
    assert "blocks.1.ls2.gamma" in state
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)

    stpred.pp.embed(prepared, encoder="uni", weights=path, img_size=SIZE, **TINY_VIT, **QUIET)
    table = _table(prepared)
    emb = table.obsm["X_emb_uni"]
    direct = from_checkpoint(path, arch="vit_large_patch16_224", init_values=1e-5, img_size=SIZE, **TINY_VIT)
    with torch.no_grad():
        expected = direct(_imagenet(_crops(prepared))).numpy()
        from_source = source.eval()(_imagenet(_crops(prepared))).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb, from_source, rtol=1e-4, atol=1e-5)
    entry = table.uns["stpred"]["embeddings"]["X_emb_uni"]
    assert entry["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["weights"] == entry["weights_file"] == str(path)
    assert entry.get("expected_sha256") is None  # none published for UNI (None is not stored)
    assert "seed" not in entry
    assert entry["encoder_kwargs"] == {"img_size": SIZE, **TINY_VIT}

    # the same architecture randomly initialised gives something else
    stpred.pp.embed(
        prepared, encoder="vit_large", key_added="X_emb_random", init_values=1e-5, img_size=SIZE, **TINY_VIT, **QUIET
    )
    assert not np.allclose(table.obsm["X_emb_random"], emb, atol=1e-3)


def test_resnet_weights_file_in_torchvision_naming(prepared, tmp_path):
    torch.manual_seed(2)
    source = resnet18(width=4, num_classes=10)  # an ImageNet-style `fc` head, dropped on loading
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    stpred.pp.embed(prepared, encoder="resnet18", weights=str(path), width=4, **QUIET)
    source.fc = None
    with torch.no_grad():
        expected = source.eval()(_imagenet(_crops(prepared))).numpy()
    np.testing.assert_allclose(_table(prepared).obsm["X_emb_resnet18"], expected, rtol=1e-5, atol=1e-5)


def test_hub_weights_are_fetched_through_huggingface_hub(prepared, tmp_path, monkeypatch):
    torch.manual_seed(3)
    path = tmp_path / "pytorch_model.bin"
    torch.save(create_vit("vit_small", img_size=SIZE, **TINY_VIT).state_dict(), path)
    asked = []

    def hf_hub_download(*, repo_id: str, filename: str) -> str:
        asked.append((repo_id, filename))
        return str(path)

    fake = types.ModuleType("huggingface_hub")
    fake.__spec__ = importlib.machinery.ModuleSpec("huggingface_hub", None)
    fake.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    stpred.pp.embed(
        prepared, encoder="vit_small", weights="hf-hub:someone/some-vit", img_size=SIZE, **TINY_VIT, **QUIET
    )
    assert asked == [("someone/some-vit", "pytorch_model.bin")]
    entry = _table(prepared).uns["stpred"]["embeddings"]["X_emb_vit_small"]
    assert entry["weights"] == "hf-hub:someone/some-vit"
    assert entry["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.gpu
def test_cuda_matches_cpu(prepared):
    stpred.pp.embed(prepared, encoder="resnet18", width=8, key_added="X_emb_cpu", **QUIET)
    stpred.pp.embed(prepared, encoder="resnet18", width=8, key_added="X_emb_gpu", progress=False, device="cuda")
    obsm = _table(prepared).obsm
    cpu, gpu = obsm["X_emb_cpu"], obsm["X_emb_gpu"]
    assert gpu.dtype == np.float32
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() > 0.99  # bf16 autocast
    assert _table(prepared).uns["stpred"]["embeddings"]["X_emb_gpu"]["precision"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_error_unknown_encoder(prepared):
    with pytest.raises(ValueError, match=r"Unknown encoder 'resnet19'; available: \[.*'resnet18'.*'uni'"):
        stpred.pp.embed(prepared, encoder="resnet19", **QUIET)
    with pytest.raises(TypeError, match="encoder name or a torch.nn.Module, found int"):
        stpred.pp.embed(prepared, encoder=18, **QUIET)


def test_error_weights(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="No weights file at"):
        stpred.pp.embed(prepared, encoder="resnet18", weights=tmp_path / "missing.pt", width=4, **QUIET)
    path = tmp_path / "wide.pt"
    torch.save(resnet18(width=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit ResNet: .*shape mismatches"):
        stpred.pp.embed(prepared, encoder="resnet18", weights=path, width=4, **QUIET)
    torch.save(resnet18(width=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer: .*missing keys"):
        stpred.pp.embed(prepared, encoder="vit_small", weights=path, img_size=SIZE, **TINY_VIT, **QUIET)
    with pytest.raises(ValueError, match=r"'hf-hub:<owner>/<repo>\[/<file>\]'"):
        stpred.pp.embed(prepared, encoder="uni", weights="hf-hub:MahmoodLab", **QUIET)
    if "huggingface_hub" not in sys.modules:
        with pytest.raises(ImportError, match="optional package `huggingface_hub`"):
            stpred.pp.embed(prepared, encoder="uni", weights="hf-hub:MahmoodLab/UNI", **QUIET)
    with pytest.raises(TypeError, match="Expected `weights` to be a file path"):
        stpred.pp.embed(prepared, encoder="resnet18", weights=3, **QUIET)


def test_error_bad_user_module(prepared):
    with pytest.raises(ValueError, match=r"2-D embeddings \(B, D\); for input shape \(100, 3, 32, 32\) it returned"):
        stpred.pp.embed(prepared, encoder=Returns(lambda x: x), **QUIET)
    with pytest.raises(ValueError, match="2-D embeddings"):
        stpred.pp.embed(prepared, encoder=Returns(lambda x: x.mean((-3, -2, -1))), **QUIET)
    with pytest.raises(TypeError, match="must return a tensor of shape"):
        stpred.pp.embed(prepared, encoder=Returns(lambda x: (x.mean((-2, -1)),)), **QUIET)
    with pytest.raises(ValueError, match=r"\['weights', 'width'\] only apply to named encoders"):
        stpred.pp.embed(prepared, encoder=MeanPool(), weights="x.pt", width=4, **QUIET)
    assert "X_emb_Returns" not in _table(prepared).obsm


def test_error_missing_table_and_patches(prepared, request):
    import spatialdata

    sdata = spatialdata.deepcopy(request.getfixturevalue("_sdata_once"))
    with pytest.raises(KeyError, match=r"No table 'stpred'.*stpred.pp.select_genes"):
        stpred.pp.embed(sdata, encoder="resnet18", **QUIET)
    stpred.pp.select_genes(sdata, n_top=4)
    with pytest.raises(KeyError, match=r"stpred.pp.extract_patches\(sdata\)"):
        stpred.pp.embed(sdata, encoder="resnet18", **QUIET)
    with pytest.raises(KeyError, match=r"asked for \(48, None\)"):
        stpred.pp.embed(prepared, encoder="resnet18", size=48, **QUIET)
    stpred.pp.extract_patches(sdata, size=SIZE, context_size=None, sections=["S0"], progress=False)
    with pytest.raises(ValueError, match="embeddings need a crop for every row"):
        stpred.pp.embed(sdata, encoder="resnet18", **QUIET)


def test_error_options(prepared):
    with pytest.raises(ValueError, match="Unknown normalize 'zscore'"):
        stpred.pp.embed(prepared, encoder="resnet18", normalize="zscore", **QUIET)
    with pytest.raises(ValueError, match="Expected `batch_size` to be a positive int, found 0"):
        stpred.pp.embed(prepared, encoder="resnet18", **{**QUIET, "batch_size": 0})
    with pytest.raises(TypeError, match="Expected `size` to be a positive int or None"):
        stpred.pp.embed(prepared, encoder="resnet18", size=32.0, **QUIET)
    with pytest.raises(TypeError, match="Expected `key_added` to be a non-empty string"):
        stpred.pp.embed(prepared, encoder="resnet18", key_added="", **QUIET)
    with pytest.raises(TypeError, match=r"Encoder 'resnet18' does not accept the options \['depth'\]"):
        stpred.pp.embed(prepared, encoder="resnet18", depth=3, **QUIET)
    with pytest.raises(ValueError, match="Expected `device` to be a torch device"):
        stpred.pp.embed(prepared, encoder="resnet18", **{**QUIET, "device": "gpu0"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            stpred.pp.embed(prepared, encoder="resnet18", **{**QUIET, "device": "cuda"})


def test_error_foreign_obsm_key(prepared):
    table = _table(prepared)
    table.obsm["X_emb_resnet18"] = np.zeros((table.n_obs, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"obsm\['X_emb_resnet18'\].*was not made by `stpred.pp.embed`"):
        stpred.pp.embed(prepared, encoder="resnet18", width=4, **QUIET)
    stpred.pp.embed(prepared, encoder="resnet18", width=4, overwrite=True, **QUIET)
    assert table.obsm["X_emb_resnet18"].shape == (table.n_obs, 32)
