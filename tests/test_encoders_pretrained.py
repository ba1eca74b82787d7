"""Published encoders by name: each checkpoint naming scheme loads strictly into a tiny variant of its architecture,
the forward matches an independent implementation of the published model, and weights are found locally, through
the hub (a fake ``huggingface_hub``: tests never download) or not at all (the error names the local-file way)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stpred
from stpred.models.encoders import pretrained
from stpred.models.encoders.pretrained import PRETRAINED, check_sha256, fetch_weights
from stpred.models.encoders.resnet import resnet50
from stpred.models.encoders.vit import create_vit, from_checkpoint
from stpred.pp._patches import get_patch_bank

SIZE = 32
#: tiny widths and depths with the published key layout (registers, SwiGLU, LayerScale, pooling kept)
TINY = {"img_size": SIZE, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}
VIT_NAMES = ("uni", "uni2_h", "h_optimus_0", "virchow", "conch")
QUIET = {"progress": False, "device": "cpu", "batch_size": 100}


def _randomized(name: str, seed: int = 0, **kw) -> nn.Module:
    """A tiny variant of a published architecture with every parameter random (LayerScale, registers included)."""
    torch.manual_seed(seed)
    model = create_vit(name, **{**TINY, **kw})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _manual_forward(state: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, patch: int, swiglu: bool,
                    no_embed_class: bool, pool: str) -> torch.Tensor:
    """The published forward, written independently from a timm-named state dict (explicit softmax attention).

    Tokens: CLS, then ``reg_token`` (if any), then patches; with ``no_embed_class`` the position embedding is added
    to the patches only. Packed SwiGLU: ``fc2(silu(first half of fc1) * second half)``.
    """
    w = state["patch_embed.proj.weight"]
    d, b = w.shape[0], x.shape[0]
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, w[0].numel())
    t = patches @ w.reshape(d, -1).T + state["patch_embed.proj.bias"]
    prefix = [state["cls_token"].expand(b, -1, -1)]
    if "reg_token" in state:
        prefix.append(state["reg_token"].expand(b, -1, -1))
    n_prefix = sum(p.shape[1] for p in prefix)
    if no_embed_class:
        t = torch.cat([*prefix, t + state["pos_embed"]], 1)
    else:
        t = torch.cat([*prefix, t], 1) + state["pos_embed"]

    def ln(z, key):
        return F.layer_norm(z, (d,), state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-6)

    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = ln(t, p + "norm1")
        q, k, v = (h @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]).reshape(
            b, -1, 3, heads, d // heads
        ).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        a = a.transpose(1, 2).reshape(b, -1, d) @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        t = t + a * state.get(p + "ls1.gamma", torch.ones(d))
        h = ln(t, p + "norm2") @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"]
        if swiglu:
            half = h.shape[-1] // 2
            h = F.silu(h[..., :half]) * h[..., half:]
        else:
            h = F.gelu(h)
        h = h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        t = t + h * state.get(p + "ls2.gamma", torch.ones(d))
    t = ln(t, "norm")
    if pool == "token+mean":
        return torch.cat([t[:, 0], t[:, n_prefix:].mean(1)], -1)
    return t[:, 0]


# --------------------------------------------------------------------------------------------------------------------
# architectures at their published sizes (built on the meta device: shapes only, no memory)

PUBLISHED_SHAPES = {
    # name: (pos_embed, reg_token or None, blocks, fc1 weight, fc2 weight, ls1.gamma present, embedding dim)
    "uni": ((1, 197, 1024), None, 24, (4096, 1024), (1024, 4096), True, 1024),
    "uni2_h": ((1, 256, 1536), (1, 8, 1536), 24, (8192, 1536), (1536, 4096), True, 1536),
    "h_optimus_0": ((1, 256, 1536), (1, 4, 1536), 40, (8192, 1536), (1536, 4096), True, 1536),
    "virchow": ((1, 257, 1280), None, 32, (6832, 1280), (1280, 3416), True, 2560),
    "conch": ((1, 785, 768), None, 12, (3072, 768), (768, 3072), False, 768),
}


@pytest.mark.parametrize("name", VIT_NAMES)
def test_published_architecture_shapes(name):
    pos, reg, depth, fc1, fc2, layerscale, dim = PUBLISHED_SHAPES[name]
    with torch.device("meta"):
        model = create_vit(name)
    state = model.state_dict()
    assert tuple(state["pos_embed"].shape) == pos
    assert (tuple(state["reg_token"].shape) if "reg_token" in state else None) == reg
    assert model.depth == depth
    assert f"blocks.{depth - 1}.norm1.weight" in state
    assert tuple(state["blocks.0.mlp.fc1.weight"].shape) == fc1
    assert tuple(state["blocks.0.mlp.fc2.weight"].shape) == fc2
    assert ("blocks.0.ls1.gamma" in state) is layerscale
    assert model.output_dim == dim == PRETRAINED[name].dim
    # timm names only: no key outside the ViT's published layout
    allowed = {"cls_token", "reg_token", "pos_embed", "patch_embed", "blocks", "norm"}
    assert {k.split(".")[0] for k in state} <= allowed


# --------------------------------------------------------------------------------------------------------------------
# strict loading + forward + embedding dimension, per naming scheme


@pytest.mark.parametrize("name", VIT_NAMES)
def test_checkpoint_loads_strictly_and_matches_published_forward(name, tmp_path):
    source = _randomized(name)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if name == "conch":  # the CoCa checkpoint: the trunk under `visual.trunk.`, beside poolers and the text tower
        saved = {f"visual.trunk.{k}": v for k, v in state.items()}
        saved |= {"visual.attn_pool_contrast.query": torch.randn(1, 4), "text.token_embedding.weight": torch.ones(3, 2)}
        saved = {"state_dict": saved}
    else:
        saved = state
    path = tmp_path / "pytorch_model.bin"
    torch.save(saved, path)
    model = from_checkpoint(path, arch=name, **TINY)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(x)
        expected = _manual_forward(
            state,
            x,
            heads=TINY["num_heads"],
            patch=TINY["patch_size"],
            swiglu=name in ("uni2_h", "h_optimus_0", "virchow"),
            no_embed_class=name in ("uni2_h", "h_optimus_0"),
            pool="token+mean" if name == "virchow" else "token",
        )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert out.shape == (2, 2 * TINY["embed_dim"] if name == "virchow" else TINY["embed_dim"])
    # a file for another architecture is refused, key by key
    other = "uni" if name != "uni" else "uni2_h"
    with pytest.raises(ValueError, match="does not fit VisionTransformer"):
        from_checkpoint(path, arch=other, **TINY)


def test_virchow_embedding_is_cls_and_mean_patch_token_and_registers_are_skipped():
    virchow = _randomized("virchow")
    uni2 = _randomized("uni2_h")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = virchow.forward_features(x)
        assert tokens.shape[1] == 1 + (SIZE // 8) ** 2
        torch.testing.assert_close(virchow(x), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))
        tokens = uni2.forward_features(x)
    assert uni2.num_prefix_tokens == 9
    assert tokens.shape[1] == 9 + (SIZE // 8) ** 2
    # registers shift with the input: changing them changes the CLS output (they take part in attention)
    before = uni2(x)
    with torch.no_grad():
        uni2.reg_token.add_(1.0)
    assert not torch.allclose(uni2(x), before)


def test_no_embed_class_pos_embed_resamples_patches_only(tmp_path):
    source = _randomized("h_optimus_0")
    path = tmp_path / "h0.bin"
    torch.save(source.state_dict(), path)
    model = from_checkpoint(path, arch="h_optimus_0", **{**TINY, "img_size": 2 * SIZE})  # 4×4 grid → 8×8
    assert model.pos_embed.shape == (1, 64, TINY["embed_dim"])
    assert model(torch.randn(1, 3, 2 * SIZE, 2 * SIZE)).shape == (1, TINY["embed_dim"])
    assert source(torch.randn(1, 3, 2 * SIZE, 2 * SIZE)).shape == (1, TINY["embed_dim"])  # dynamic size


def test_swiglu_hidden_width_must_be_even():
    with pytest.raises(ValueError, match="even SwiGLU hidden width"):
        create_vit("uni2_h", **{**TINY, "mlp_ratio": 1.375})  # int(24 * 1.375) = 33
    with pytest.raises(ValueError, match="`mlp_layer`"):
        create_vit("vit", **TINY, mlp_layer="geglu")
    with pytest.raises(ValueError, match="`global_pool`"):
        create_vit("vit", **TINY, global_pool="avg")


# --------------------------------------------------------------------------------------------------------------------
# pp.embed: published encoders by name


@pytest.fixture
def prepared(sdata):
    stpred.pp.select_genes(sdata, n_top=4)
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=SIZE, context_size=None, progress=False)
    return sdata


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty weights directory and no ``huggingface_hub``: nothing can be found or downloaded."""
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)


def _fake_hub(monkeypatch, fn) -> None:
    fake = types.ModuleType("huggingface_hub")
    fake.__spec__ = importlib.machinery.ModuleSpec("huggingface_hub", None)
    fake.hf_hub_download = fn
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)


def _crops(sdata) -> torch.Tensor:
    return torch.from_numpy(get_patch_bank(sdata).spot.copy()).float() / 255


@pytest.mark.parametrize(("name", "dim"), [("virchow", 48), ("h_optimus_0", 24), ("conch", 24)])
def test_embed_published_encoder_from_local_file(prepared, tmp_path, name, dim):
    source = _randomized(name)
    path = tmp_path / f"{name}.bin"
    torch.save(source.state_dict(), path)
    stpred.pp.embed(prepared, encoder=name, weights=path, **TINY, **QUIET)
    table = prepared.tables["stpred"]
    emb = table.obsm[f"X_emb_{name}"]
    assert emb.shape == (table.n_obs, dim)
    spec = PRETRAINED[name]
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source((_crops(prepared) - mean) / std).numpy()  # the encoder's own published statistics
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)
    entry = table.uns["stpred"]["embeddings"][f"X_emb_{name}"]
    assert entry["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["weights_file"] == str(path)
    np.testing.assert_allclose(entry["pixel_mean"], spec.mean)
    assert entry["dim"] == dim


def test_published_encoder_uses_local_copy_then_hub(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    hub_file = tmp_path / "hub" / "pytorch_model.bin"
    hub_file.parent.mkdir()
    torch.save(_randomized("uni2_h", seed=3).state_dict(), hub_file)
    asked = []

    def hf_hub_download(*, repo_id: str, filename: str) -> str:
        asked.append((repo_id, filename))
        return str(hub_file)

    _fake_hub(monkeypatch, hf_hub_download)
    # no local copy: the hub is asked for the model card's repository and file
    stpred.pp.embed(prepared, encoder="UNI2-h", **TINY, **QUIET)
    assert asked == [("MahmoodLab/UNI2-h", "pytorch_model.bin")]
    entry = prepared.tables["stpred"].uns["stpred"]["embeddings"]["X_emb_uni2_h"]
    assert entry["weights_file"] == str(hub_file)
    assert entry["weights_sha256"] == hashlib.sha256(hub_file.read_bytes()).hexdigest()
    assert prepared.tables["stpred"].obsm["X_emb_uni2_h"].shape[1] == TINY["embed_dim"]

    # a local copy under $STPRED_WEIGHTS_DIR/<name>/<file> wins over the hub
    local = PRETRAINED["uni2_h"].local_path
    assert local == tmp_path / "weights" / "uni2_h" / "pytorch_model.bin"
    local.parent.mkdir(parents=True)
    torch.save(_randomized("uni2_h", seed=4).state_dict(), local)
    stpred.pp.embed(prepared, encoder="uni2_h", key_added="X_local", **TINY, **QUIET)
    assert len(asked) == 1
    entry = prepared.tables["stpred"].uns["stpred"]["embeddings"]["X_local"]
    assert entry["weights_file"] == str(local)
    assert fetch_weights("uni2_h") == local


def test_without_hub_the_error_names_the_local_file(prepared, no_hub):
    table = prepared.tables["stpred"]
    before = set(table.obsm)
    with pytest.raises(ImportError, match=r"huggingface_hub.*pass its path as `weights=` or put it at .*uni2_h"):
        stpred.pp.embed(prepared, encoder="uni2_h", **TINY, **QUIET)
    assert set(table.obsm) == before  # the failed call changed nothing
    with pytest.raises(ImportError, match=r"MahmoodLab/CONCH.*STPRED_WEIGHTS_DIR"):
        fetch_weights("conch")


@pytest.mark.parametrize(
    ("error", "match"),
    [("LocalEntryNotFoundError", r"Could not download .*virchow"), ("GatedRepoError", r"huggingface-cli login")],
)
def test_offline_or_gated_hub_errors_name_the_fix(tmp_path, monkeypatch, error, match):
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path))
    exc = type(error, (Exception,), {})

    def hf_hub_download(*, repo_id: str, filename: str) -> str:
        raise exc("401 Client Error" if error == "GatedRepoError" else "offline")

    _fake_hub(monkeypatch, hf_hub_download)
    with pytest.raises(OSError, match=match) as info:
        fetch_weights("virchow")
    assert "weights=" in str(info.value)


def test_resnet50_imagenet_torchvision_file_and_hash_check(prepared, tmp_path, monkeypatch, no_hub):
    torch.manual_seed(5)
    source = resnet50(width=4, num_classes=10)  # torchvision layout with an ImageNet-style `fc`, dropped on loading
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    # not the published file: its sha256 does not start with torchvision's 0676ba61
    with pytest.warns(UserWarning, match="not the published 0676ba61"):
        stpred.pp.embed(prepared, encoder="resnet50_imagenet", weights=path, width=4, **QUIET)
    table = prepared.tables["stpred"]
    assert table.obsm["X_emb_resnet50_imagenet"].shape[1] == 128  # 32 × width
    entry = table.uns["stpred"]["embeddings"]["X_emb_resnet50_imagenet"]
    assert entry["expected_sha256"] == "0676ba61"
    assert entry["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    source.fc = None
    with torch.no_grad():
        mean, std = torch.tensor(PRETRAINED["resnet50_imagenet"].mean), torch.tensor(PRETRAINED["resnet50_imagenet"].std)
        expected = source.eval()((_crops(prepared) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).numpy()
    np.testing.assert_allclose(table.obsm["X_emb_resnet50_imagenet"], expected, rtol=1e-4, atol=1e-4)

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert check_sha256("uni", digest)  # nothing published: no check
    monkeypatch.setitem(
        PRETRAINED, "resnet50_imagenet", PRETRAINED["resnet50_imagenet"].__class__(
            **{**PRETRAINED["resnet50_imagenet"].__dict__, "expected_sha256": digest[:8]}
        )
    )
    assert check_sha256("resnet50_imagenet", digest)


def test_resnet50_imagenet_downloads_into_the_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path))
    calls = []

    def download(url, dst, *, hash_prefix):
        calls.append((url, dst, hash_prefix))
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save(resnet50(width=4).state_dict(), dst)

    monkeypatch.setattr(pretrained, "_download_url", download)
    path = fetch_weights("resnet50_imagenet")
    assert path == tmp_path / "resnet50_imagenet" / "resnet50-0676ba61.pth"
    assert calls == [("https://download.pytorch.org/models/resnet50-0676ba61.pth", path, "0676ba61")]
    assert fetch_weights("resnet50_imagenet") == path  # found locally the second time
    assert len(calls) == 1

    def offline(url, dst, *, hash_prefix):
        msg = "Network is unreachable"
        raise OSError(msg)

    monkeypatch.setattr(pretrained, "_download_url", offline)
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(OSError, match=r"Network is unreachable.*pass its path as `weights=`"):
        fetch_weights("resnet50_imagenet")


# --------------------------------------------------------------------------------------------------------------------
# MMAP backbone by name


def test_mmap_backbone_with_registers_attends_over_patch_tokens_only(tmp_path):
    from stpred.models.mmap import MMAP

    source = _randomized("uni2_h")
    path = tmp_path / "uni2.bin"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    model = MMAP(
        3,
        backbone="uni2_h",
        backbone_weights=str(path),
        backbone_kwargs=TINY,
        lora_blocks=2,
        lora_rank=2,
        attn_heads=2,
        attn_dim_head=8,
        proto_k_min=2,
        proto_k_max=4,
    ).eval()
    torch.testing.assert_close(model.backbone.reg_token, source.reg_token)
    seen = []
    model.local_attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    g = torch.Generator().manual_seed(0)
    out = model({"spot": torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)})
    assert out["pred"].shape == (2, 3)
    n_patches = (model.backbone.img_size // 8) ** 2
    assert seen == [torch.Size([2, 1 + 2 * n_patches, TINY["embed_dim"]])]  # CLS + two views' patches, no registers
