from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stpred._imaging import standardize
from stpred.models import get_model
from stpred.models._augment import dihedral
from stpred.models._base import TrainDefaults
from stpred.models.encoders.resnet import resnet10, resnet18
from stpred.models.hifusion import TINY_CONFIG, HiFusion, HiFusionConfig, mosaic, tile

N_GENES = 6


def _batch(model: HiFusion, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return {
        "spot": torch.randint(0, 256, (n, 3, c.spot_size, c.spot_size), dtype=torch.uint8, generator=g),
        "context": torch.randint(0, 256, (n, 3, c.context_size, c.context_size), dtype=torch.uint8, generator=g),
        "target": torch.randn(n, c.n_genes, generator=g),
    }


@pytest.fixture
def tiny() -> HiFusion:
    torch.manual_seed(0)
    return HiFusion.tiny(N_GENES)


# ---------------------------------------------------------------- tiling and mosaic


@pytest.mark.parametrize("grid", [1, 2, 7])
def test_tile_mosaic_round_trip(grid):
    x = torch.randn(3, 2, 28, 28)
    torch.testing.assert_close(mosaic(tile(x, grid), grid), x, rtol=0, atol=0)


def test_tile_order_and_mosaic_positions():
    # every 32 px tile of a 224 px image has its own constant value v = 100*b + 10*i + j
    b_idx, i_idx, j_idx = torch.meshgrid(torch.arange(2), torch.arange(7), torch.arange(7), indexing="ij")
    values = (100 * b_idx + 10 * i_idx + j_idx).float()  # (2, 7, 7)
    x = values.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand(2, 3, 224, 224)
    tiles = tile(x, 7)
    assert tiles.shape == (2 * 49, 3, 32, 32)
    # tile (b, i, j) sits at index (b*7 + i)*7 + j and is constant
    for b, i, j in [(0, 0, 0), (0, 2, 5), (1, 6, 1), (1, 3, 3)]:
        t = tiles[(b * 7 + i) * 7 + j]
        assert torch.all(t == 100 * b + 10 * i + j)
    # a tile-mean "encoder" gives 1×1 maps; the mosaic puts each mean where the tile's pixels were
    means = tiles.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(mosaic(means, 7)[:, 0], values)


class _PoolEncoder(nn.Module):
    """Stand-in trunk: 16×16 average pooling, so every level can be computed independently."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 16)


def test_levels_put_sub_patch_features_in_place():
    model = HiFusion(N_GENES, width=8)
    model.spot_encoder = _PoolEncoder()
    x = torch.randn(2, 3, 224, 224)
    expected = F.avg_pool2d(x, 16)  # (2, 3, 14, 14): where each pixel block really is
    levels = model.spot_levels(x)
    assert len(levels) == 3
    for level in levels:  # 1×(14×14), 2×2×(7×7), 7×7×(2×2): all equal the whole-image pooling
        torch.testing.assert_close(level, expected)


def test_level_geometry_at_full_size():
    torch.manual_seed(0)
    model = HiFusion(N_GENES, width=8).eval()
    spot = torch.randn(1, 3, 224, 224)
    f0, f1, f2 = model.spot_levels(spot)
    assert f0.shape == f1.shape == f2.shape == (1, 64, 7, 7)
    # level 1 = 8×8 mosaic of the 2×2 crops' 4×4 maps, max-pooled to 7×7
    with torch.no_grad():
        crops = model.spot_encoder.forward_features(tile(spot, 2))
        assert crops.shape == (4, 64, 4, 4)
        mos = mosaic(crops, 2)
        torch.testing.assert_close(f1, F.adaptive_max_pool2d(mos, 7))
        # top-right crop (pixels [0:112, 112:224]) lands in the top-right 4×4 block
        torch.testing.assert_close(mos[0, :, :4, 4:], model.spot_encoder.forward_features(spot[:, :, :112, 112:])[0])
        # level 2: the 32 px crop at row 3, col 5 gives the feature at (3, 5)
        torch.testing.assert_close(
            f2[0, :, 3, 5], model.spot_encoder.forward_features(spot[:, :, 96:128, 160:192])[0, :, 0, 0]
        )


# ---------------------------------------------------------------- model


def test_parameter_count_matches_reference():
    model = HiFusion(250)
    n = sum(p.numel() for p in model.parameters())
    assert n == 17_390_455  # reference: 17.39 M
    assert sum(p.numel() for p in model.spot_encoder.parameters()) == 11_176_512
    assert sum(p.numel() for p in model.context_encoder.parameters()) == 4_905_792
    assert sum(p.numel() for p in model.attn.parameters()) == 1_050_624


def test_forward_shapes(tiny):
    batch = _batch(tiny, n=3)
    out = tiny(batch)
    assert out["pred"].shape == (3, N_GENES)
    assert len(out["level_preds"]) == 3
    assert all(p.shape == (3, N_GENES) for p in out["level_preds"])
    assert all(f.shape == (3, 64, 2, 2) for f in out["level_features"])
    torch.testing.assert_close(out["fusion_weights"], torch.full((3,), 1 / 3))


def test_full_size_forward(tmp_path):
    torch.manual_seed(0)
    model = HiFusion(N_GENES, width=8).eval()
    with torch.no_grad():
        out = model(_batch(model, n=1))
    assert out["pred"].shape == (1, N_GENES)
    assert all(f.shape == (1, 64, 7, 7) for f in out["level_features"])


def test_loss_matches_definition(tiny):
    batch = _batch(tiny)
    out = tiny(batch)
    parts = tiny.loss(out, batch)
    y = batch["target"]
    mse = ((out["pred"] - y) ** 2).mean()
    aux = sum(((p - y) ** 2).mean() for p in out["level_preds"]) / 3
    f0, f1, f2 = out["level_features"]
    align = (f0 - f1).abs().mean() + (f0 - f2).abs().mean()
    torch.testing.assert_close(parts.mse, mse.detach())
    torch.testing.assert_close(parts.extra["aux_mse"], aux.detach())
    torch.testing.assert_close(parts.extra["align"], align.detach())
    torch.testing.assert_close(parts.loss, mse + aux + 0.5 * align)


def test_backward_reaches_every_parameter(tiny):
    tiny.train()
    batch = _batch(tiny)
    losses = tiny.loss(tiny(tiny.augment(batch, 0.0)), batch)
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    no_grad = [n for n, p in tiny.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


def test_prediction_uses_both_crops(tiny):
    tiny.eval()
    batch = _batch(tiny, n=1)
    with torch.no_grad():
        base = tiny(batch)["pred"]
        other_spot = tiny({**batch, "spot": _batch(tiny, n=1, seed=1)["spot"]})["pred"]
        other_ctx = tiny({**batch, "context": _batch(tiny, n=1, seed=1)["context"]})["pred"]
    assert not torch.allclose(base, other_spot)
    assert not torch.allclose(base, other_ctx)


def test_channels_last_and_autocast(tiny):
    tiny.eval()
    batch = _batch(tiny)
    with torch.no_grad():
        ref = tiny(batch)["pred"]
        cl = HiFusion.tiny(N_GENES, channels_last=True)
        cl.load_state_dict(tiny.state_dict())
        cl.eval()
        assert cl.spot_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(batch)["pred"], ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(batch)
            losses = tiny.loss(out, batch)
    assert torch.isfinite(out["pred"].float()).all()
    assert losses.loss.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_bf16_channels_last():
    model = HiFusion.tiny(N_GENES).cuda().to(memory_format=torch.channels_last)
    batch = {k: v.cuda() for k, v in _batch(model).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        batch = model.augment(batch, 0.5)
        losses = model.loss(model(batch), batch)
    losses.loss.backward()
    assert torch.isfinite(losses.loss)


def test_augment_same_transform_on_both_crops(tiny):
    batch = _batch(tiny, n=16)
    # make the context's centre equal to the spot crop, as for real centred crops
    off = (tiny.config.context_size - tiny.config.spot_size) // 2
    s = tiny.config.spot_size
    batch["context"][:, :, off : off + s, off : off + s] = batch["spot"]
    torch.manual_seed(1)
    aug = tiny.augment(batch, 0.3)
    assert aug["target"] is batch["target"]
    torch.testing.assert_close(aug["context"][:, :, off : off + s, off : off + s], aug["spot"])
    assert not torch.equal(aug["spot"], batch["spot"])  # 16 draws: at least one is not the identity
    assert HiFusion.tiny(N_GENES, augment=False).augment(batch, 0.3)["spot"] is batch["spot"]


def test_registry_and_declarations():
    assert get_model("hifusion") is HiFusion
    model = HiFusion.tiny(N_GENES)
    cfg = model.config
    # the reference recipe, including one section per training batch (BatchNorm statistics)
    assert cfg.train == TrainDefaults(
        lr=1e-3,
        weight_decay=1e-5,
        optimizer="adam",
        scheduler="cosine",
        min_lr=1e-6,
        max_epochs=50,
        batch_size=32,
        batch_per_section=True,
    )
    # the patch geometry the engine asks for follows the config
    assert model.crop_sizes == (cfg.spot_size, cfg.context_size)
    other = HiFusion.tiny(N_GENES, spot_size=2 * cfg.spot_size, context_size=4 * cfg.spot_size)
    assert other.crop_sizes == (2 * cfg.spot_size, 4 * cfg.spot_size)
    # a config survives dataclasses.asdict (tuples → lists, train → dict), as in a saved predictor
    plain = dataclasses.asdict(cfg)
    plain["grids"] = list(plain["grids"])
    rebuilt = HiFusion(**plain)
    assert rebuilt.config == cfg


def test_config_errors():
    with pytest.raises(TypeError, match=r"Unknown HiFusion option\(s\) \['widht'\]\. Valid options: \[.*'width'"):
        HiFusion(N_GENES, widht=8)
    with pytest.raises(ValueError, match="not divisible by the grid"):
        HiFusion(N_GENES, **{**TINY_CONFIG, "grids": (1, 3)})
    with pytest.raises(ValueError, match="start with 1"):
        HiFusionConfig(n_genes=3, grids=(2, 7))
    with pytest.raises(ValueError, match="not divisible by `n_heads`"):
        HiFusionConfig(n_genes=3, width=8, n_heads=5)
    with pytest.raises(ValueError, match="positive integers"):
        HiFusionConfig(n_genes=0)
    with pytest.raises(ValueError, match="attn_dropout"):
        HiFusionConfig(n_genes=3, attn_dropout=1.0)
    with pytest.raises(ValueError, match="alignment_weight"):
        HiFusionConfig(n_genes=3, alignment_weight=-1.0)


def test_batch_errors(tiny):
    batch = _batch(tiny)
    with pytest.raises(KeyError, match=r"missing \['context'\]"):
        tiny({"spot": batch["spot"]})
    swapped = {"spot": batch["context"], "context": batch["spot"]}
    with pytest.raises(
        ValueError, match=r"Expected batch\['spot'\] of shape \(B, 3, 64, 64\), found \(2, 3, 128, 128\)"
    ):
        tiny(swapped)
    with pytest.raises(ValueError, match="as many context crops"):
        tiny({"spot": batch["spot"], "context": batch["context"][:1]})
    out = tiny(batch)
    with pytest.raises(KeyError, match="needs batch\\['target'\\]"):
        tiny.loss(out, {"spot": batch["spot"]})
    with pytest.raises(ValueError, match="Expected batch\\['target'\\] of shape \\(2, 6\\)"):
        tiny.loss(out, {"target": torch.zeros(2, 5)})


def test_pretrained_weights_from_config(tmp_path):
    torch.manual_seed(0)
    spot_src = resnet18(width=8, num_classes=1000)  # a torchvision-style file with its ImageNet head
    ctx_src = resnet10(width=8)
    torch.save(spot_src.state_dict(), tmp_path / "spot.pt")
    torch.save({"state_dict": ctx_src.state_dict()}, tmp_path / "ctx.pt")
    model = HiFusion.tiny(N_GENES, spot_weights=str(tmp_path / "spot.pt"), context_weights=tmp_path / "ctx.pt")
    torch.testing.assert_close(model.spot_encoder.layer3[1].conv2.weight, spot_src.layer3[1].conv2.weight)
    torch.testing.assert_close(model.context_encoder.conv1.weight, ctx_src.conv1.weight)
    assert isinstance(model.config.context_weights, str)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        HiFusion.tiny(N_GENES, spot_weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not fit ResNet"):
        HiFusion.tiny(N_GENES, spot_weights=tmp_path / "ctx.pt")  # a ResNet-10 file for the ResNet-18 trunk


# ---------------------------------------------------------------- dihedral and standardisation


def _all_dihedral_reference(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square, built with rot90 and one flip."""
    return [torch.rot90(y, r, dims=(-2, -1)) for y in (x, x.flip(-1)) for r in range(4)]


def test_dihedral_all_eight_distinct_and_complete():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(8, 2, 4, 4)
    (out,) = dihedral(x, k=torch.arange(8))
    flat = [o.flatten().tolist() for o in out]
    assert len({tuple(f) for f in flat}) == 8
    ref = {tuple(r[0].flatten().tolist()) for r in _all_dihedral_reference(x[:1])}
    assert {tuple(f) for f in flat} == ref


def test_dihedral_named_elements():
    x = torch.randn(1, 3, 5, 5)

    def apply(k: int) -> torch.Tensor:
        return dihedral(x, k=torch.tensor([k]))[0]

    torch.testing.assert_close(apply(0), x)
    torch.testing.assert_close(apply(1), x.flip(-1))
    torch.testing.assert_close(apply(2), x.flip(-2))
    torch.testing.assert_close(apply(3), torch.rot90(x, 2, dims=(-2, -1)))
    torch.testing.assert_close(apply(4), x.transpose(-1, -2))


def test_dihedral_group_consistency():
    x = torch.randn(1, 1, 6, 6)
    ks = torch.arange(8)
    images = dihedral(x.expand(8, 1, 6, 6), k=ks)[0]
    keys = {tuple(im.flatten().tolist()): i for i, im in enumerate(images)}
    for a in range(8):
        composed = dihedral(images, k=torch.full((8,), a))[0]
        hits = [keys.get(tuple(im.flatten().tolist())) for im in composed]
        assert None not in hits  # closed under composition
        assert sorted(hits) == list(range(8))  # left multiplication is a permutation (so inverses exist)


def test_dihedral_marker_in_both_crops():
    s, c = 8, 16
    off = (c - s) // 2
    k = torch.arange(8)
    spot = torch.zeros(8, 1, s, s)
    ctx = torch.zeros(8, 1, c, c)
    spot[:, 0, 1, 2] = 1  # marker, asymmetric position
    ctx[:, 0, 1 + off, 2 + off] = 1  # the same physical point in the context crop
    out_s, out_c = dihedral(spot, ctx, k=k)
    for i in range(8):
        ys, xs = (out_s[i, 0] == 1).nonzero()[0].tolist()
        yc, xc = (out_c[i, 0] == 1).nonzero()[0].tolist()
        assert (yc, xc) == (ys + off, xs + off)


def test_dihedral_random_draw_and_errors():
    x = torch.randint(0, 255, (4, 3, 6, 6), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = dihedral(x, generator=g1)[0]
    b = dihedral(x, generator=g2)[0]
    assert torch.equal(a, b)
    assert a.dtype == torch.uint8
    assert a.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="square images"):
        dihedral(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="to hold 2 samples"):
        dihedral(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        dihedral(torch.zeros(2, 3, 4, 4), k=torch.zeros(2))
    with pytest.raises(ValueError, match="at least one image"):
        dihedral()


def test_standardize_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 3, 10, 12), dtype=np.uint8)
    x[1, 2] = 77  # a flat channel maps to 0 (reference: std 0 → 1)
    out = standardize(torch.from_numpy(x))
    xf = x.astype(np.float64)
    mean = xf.mean(axis=(-2, -1), keepdims=True)
    std = xf.std(axis=(-2, -1), ddof=1, keepdims=True)
    std[std == 0] = 1
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), (xf - mean) / std, atol=1e-5)
    assert torch.all(out[1, 2] == 0)
