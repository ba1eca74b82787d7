from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stpred.models import TrainDefaults, get_model
from stpred.models._augment import brightness_contrast, elastic
from stpred.models._kmeans import kmeans
from stpred.models.encoders.lora import lora_parameters
from stpred.models.encoders.vit import VisionTransformer
from stpred.models.mmap import MMAP, MMAPConfig, QueryAttention, RandomBackboneWarning, _similarity_loss

# the tiny test backbones are random on purpose; the warning itself is tested below
pytestmark = pytest.mark.filterwarnings("ignore::stpred.models.mmap.RandomBackboneWarning")

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = {
    "backbone": "vit",
    "backbone_kwargs": VIT,
    "lora_blocks": 2,
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "attn_heads": 2,
    "attn_dim_head": 8,
    "proto_k_min": 4,
    "proto_k_max": 8,
}
G = 6


def tiny_mmap(seed: int = 0, **kw) -> MMAP:
    torch.manual_seed(seed)
    return MMAP(G, **{**TINY, **kw})


def spots(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def blobs(n: int, d: int, centers: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, d, generator=g) * 5
    return mu[torch.arange(n) % centers] + torch.randn(n, d, generator=g)


# --------------------------------------------------------------------------- K-means


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_inertia_matches_sklearn(seed: int) -> None:
    from sklearn.cluster import KMeans

    noise = torch.randn(600, 16, generator=torch.Generator().manual_seed(seed + 10)) * 2
    x = blobs(600, 16, 12, seed=seed) + noise  # overlapping blobs: local optima exist
    ours = kmeans(x, 12, n_init=10, seed=seed)
    ref = KMeans(12, n_init=10, random_state=seed).fit(x.numpy())
    assert ours.inertia <= ref.inertia_ * 1.05
    # inertia is what it claims to be
    expected = ((x - ours.centroids[ours.labels]) ** 2).sum()
    assert ours.inertia == pytest.approx(float(expected), rel=1e-4)
    # labels are the nearest centroid and centroids the means of their points
    assert torch.equal(ours.labels, torch.cdist(x, ours.centroids).argmin(1))
    for c in range(12):
        torch.testing.assert_close(ours.centroids[c], x[ours.labels == c].mean(0), atol=1e-4, rtol=1e-4)


def test_kmeans_recovers_blobs_and_is_seeded() -> None:
    x = blobs(200, 8, 4)
    a, b = kmeans(x, 4, seed=5), kmeans(x, 4, seed=5)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.centroids, b.centroids)
    truth = torch.arange(200) % 4
    # each found cluster is exactly one true blob
    assert len({(int(t), int(p)) for t, p in zip(truth, a.labels)}) == 4


def test_kmeans_cosine_matches_sklearn_on_normalised_rows() -> None:
    from sklearn.cluster import KMeans

    x = blobs(300, 8, 6, seed=3)
    ours = kmeans(x, 6, metric="cosine", n_init=3, seed=0)
    assert torch.allclose(ours.centroids.norm(dim=1), torch.ones(6))
    xn = F.normalize(x, dim=1)
    cos = (xn * ours.centroids[ours.labels]).sum(1)
    assert ours.inertia == pytest.approx(float((1 - cos).sum()), rel=1e-4)
    ref = KMeans(6, n_init=3, random_state=0).fit(xn.numpy())
    assert ours.inertia <= ref.inertia_ / 2 * 1.05  # on unit vectors ‖a - b‖² = 2(1 - cos); spherical means ≥ ok


def test_kmeans_errors() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="`k` between 1 and the number of points 10"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match=r"2-D tensor of features \(N, D\)"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match="Unknown metric 'manhattan'"):
        kmeans(x, 2, metric="manhattan")
    with pytest.raises(ValueError, match="`n_init` to be a positive integer"):
        kmeans(x, 2, n_init=0)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite features"):
        kmeans(x, 2)


# --------------------------------------------------------------------------- views


def test_views_centred_at_inference() -> None:
    model = tiny_mmap()
    x = spots(3).float() / 255
    views = model.make_views(x, random=False)
    assert views.shape == (3, 3, 3, 32, 32)
    torch.testing.assert_close(views[0], x)
    for v, (lo, hi) in ((1, (8, 24)), (2, (12, 20))):
        expected = F.interpolate(x[:, :, lo:hi, lo:hi], size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(views[v], expected)
    # uint8 input is scaled to [0, 1]
    torch.testing.assert_close(model.make_views(spots(3), random=False), views)


def test_views_random_in_training() -> None:
    model = tiny_mmap()
    x = spots(6, seed=1).float() / 255
    torch.manual_seed(0)
    views = model.make_views(x, random=True)
    for v, c in ((1, 16), (2, 8)):
        offsets = set()
        for i in range(6):  # the view is exactly one crop of side c, resized
            cands = [
                (oy, ox)
                for oy in range(33 - c)
                for ox in range(33 - c)
                if torch.allclose(
                    F.interpolate(
                        x[i : i + 1, :, oy : oy + c, ox : ox + c], size=(32, 32), mode="bilinear", align_corners=False
                    ),
                    views[v, i : i + 1],
                )
            ]
            assert len(cands) == 1
            offsets.add(cands[0])
        assert len(offsets) > 1  # positions differ between spots
    # the model uses random crops in train mode and centred ones in eval mode
    model.train()
    a, b = model({"spot": spots(4)})["cls"], model({"spot": spots(4)})["cls"]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model({"spot": spots(4)})["cls"], model({"spot": spots(4)})["cls"])
    reference = tiny_mmap(random_crops_at_inference=True).eval()
    assert not torch.allclose(reference({"spot": spots(4)})["cls"], reference({"spot": spots(4)})["cls"])


def test_view_errors() -> None:
    model = tiny_mmap()
    with pytest.raises(ValueError, match=r"spot crops of shape \(B, C, H, W\)"):
        model.make_views(torch.zeros(3, 32, 32), random=False)
    with pytest.raises(ValueError, match="at least 4×4 pixels"):
        model.make_views(torch.zeros(1, 3, 2, 2), random=False)


# --------------------------------------------------------------------------- phase 1


def test_phase1_shapes_and_trainable_parameters() -> None:
    model = tiny_mmap()
    assert get_model("mmap") is MMAP
    assert MMAP.inputs == ("spot", "slide")
    assert model.phases == (1, 2)
    assert tiny_mmap(phase=1).phases == (1,)
    assert model.phase == 1
    assert MMAP.batching == "spots"
    out = model.train()({"spot": spots(4)})
    assert out["pred"].shape == (4, G)
    assert out["feature"].shape == (4, 32)
    assert out["cls"].shape == (4, 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n in trainable if n.startswith("backbone.")}
    assert backbone
    assert all(".lora_" in n for n in backbone)
    assert {n.split(".")[0] for n in trainable} == {"backbone", "local_attn", "head1", "head2"}
    losses = model.loss(out, {"target": torch.randn(4, G)})
    losses.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_phase1_prediction_is_mean_of_two_heads() -> None:
    model = tiny_mmap().eval()
    out = model({"spot": spots(3)})
    expected = 0.5 * (model.head1(out["feature"]) + model.head2(out["cls"]))
    torch.testing.assert_close(out["pred"], expected)


def test_similarity_losses_against_loops() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    cos = np.array([[float(F.cosine_similarity(a[i], b[j], dim=0)) for j in range(5)] for i in range(5)])
    hinge = (
        sum(1 - cos[i, i] for i in range(5))
        + sum(max(0.0, cos[i, j] - 0.2) for i in range(5) for j in range(5) if i != j)
    ) / 5
    assert float(_similarity_loss(a, b, kind="hinge", margin=0.2)) == pytest.approx(hinge, rel=1e-5)
    assert float(_similarity_loss(a, b, kind="cosine", margin=0.2)) == pytest.approx(
        np.mean(1 - np.diag(cos)), rel=1e-5
    )


def test_mag_loss_warmup_uses_progress() -> None:
    model = tiny_mmap(mag_loss_warmup=0.5, augment=False).train()
    batch = {"spot": spots(4), "target": torch.randn(4, G)}
    model.augment(batch, 0.1)
    out = model(batch)
    early = model.loss(out, batch)
    torch.testing.assert_close(early.loss, F.mse_loss(out["pred"], batch["target"]))
    model.augment(batch, 0.6)
    late = model.loss(out, batch)
    torch.testing.assert_close(late.loss, late.mse + 0.1 * late.extra["mag"])


def test_augment_draws_square_symmetries() -> None:
    model = tiny_mmap(elastic_p=0.0, brightness_contrast_p=0.0)  # only the dihedral maps
    x = spots(64)
    torch.manual_seed(0)
    out = model.augment({"spot": x, "target": torch.zeros(64, G)}, 0.0)["spot"]
    assert out.dtype == torch.uint8
    assert out.shape == x.shape
    seen = set()
    for i in range(64):
        candidates = {}
        for k in range(4):
            for t in (False, True):
                y = torch.rot90(x[i], k, dims=(-2, -1))
                candidates[(k, t)] = y.transpose(-1, -2) if t else y
        match = [key for key, y in candidates.items() if torch.equal(y, out[i])]
        assert len(match) == 1  # random crops are not symmetric: exactly one of the 8 maps explains the output
        seen.add(match[0])
    assert len(seen) == 8  # all 8 square symmetries are drawn (64 seeded draws)
    model.set_phase(2)
    assert model.augment({"spot": x}, 0.0)["spot"] is x


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_elastic_and_brightness_contrast_keep_dtype_shape_range(dtype) -> None:
    x = spots(8)
    x = x if dtype == torch.uint8 else x.float() / 255.0
    top = 255 if dtype == torch.uint8 else 1.0
    for out in (elastic(x, p=1.0), brightness_contrast(x, p=1.0, brightness=0.5, contrast=0.5)):
        assert out.dtype == x.dtype
        assert out.shape == x.shape
        assert out.min() >= 0
        assert out.max() <= top
        assert not torch.equal(out, x)
    # off: the input itself comes back
    assert elastic(x, p=0.0) is x
    assert brightness_contrast(x, p=0.0) is x
    # no displacement / no change of intensity: identity (bilinear sampling at the pixel centres is exact)
    torch.testing.assert_close(elastic(x, p=1.0, alpha=0.0), x)
    torch.testing.assert_close(brightness_contrast(x, p=1.0, brightness=0.0, contrast=0.0), x)


def test_elastic_and_brightness_contrast_respect_probability() -> None:
    torch.manual_seed(0)
    x = spots(400, size=16)
    changed = {}
    for name, fn, p in (
        ("elastic", lambda t: elastic(t, p=0.5, sigma=2.0, alpha=20.0), 0.5),
        ("color", lambda t: brightness_contrast(t, p=0.1), 0.1),
    ):
        out = fn(x)
        changed[name] = (out != x).flatten(1).any(1).float().mean().item()
        assert changed[name] == pytest.approx(p, abs=0.06), name  # 400 draws: 4 standard errors ≈ 0.06
    # the elastic field moves pixels by a few pixels at most (alpha 20, sigma 2 on a 16 px crop), not globally
    moved = elastic(x.float(), p=1.0, sigma=2.0, alpha=20.0)
    assert (moved - x.float()).abs().mean() > 1.0


def test_augment_applies_reference_probabilities_and_can_be_turned_off() -> None:
    cfg = MMAPConfig(G)
    assert (cfg.elastic_p, cfg.elastic_alpha, cfg.elastic_sigma) == (0.5, 120.0, 6.0)
    assert (cfg.brightness_contrast_p, cfg.brightness_limit, cfg.contrast_limit) == (0.1, 0.2, 0.2)
    x = spots(64)
    torch.manual_seed(1)
    out = tiny_mmap().augment({"spot": x}, 0.0)["spot"]
    assert out.dtype == torch.uint8
    assert out.shape == x.shape
    torch.manual_seed(1)
    flips = tiny_mmap(elastic_p=0.0, brightness_contrast_p=0.0).augment({"spot": x}, 0.0)["spot"]
    differs = (out != flips).flatten(1).any(1).float().mean().item()
    assert 0.35 < differs < 0.75  # elastic (p 0.5) or colour (p 0.1): 1 - 0.5 · 0.9 = 0.55 expected
    assert tiny_mmap(augment=False).augment({"spot": x}, 0.0)["spot"] is x
    with pytest.raises(ValueError, match="elastic_p"):
        MMAPConfig(G, elastic_p=1.5)


def test_random_backbone_warns_once_and_names_the_fix(tmp_path) -> None:
    with pytest.warns(RandomBackboneWarning, match="backbone_weights=") as record:
        tiny_mmap()
    assert len([w for w in record if issubclass(w.category, RandomBackboneWarning)]) == 1
    assert issubclass(RandomBackboneWarning, UserWarning)
    path = tmp_path / "vit.pt"
    torch.save(VisionTransformer(**VIT).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomBackboneWarning)
        tiny_mmap(backbone_weights=str(path))  # pretrained weights: no warning


def test_phase1_bf16_autocast() -> None:
    model = tiny_mmap().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"spot": spots(2)})
    assert torch.isfinite(out["pred"].float()).all()


# --------------------------------------------------------------------------- prototypes


def test_k_and_l_rules() -> None:
    model = tiny_mmap(proto_k_min=32, proto_k_max=80)
    assert [model.n_prototypes(n) for n in (32, 100, 176, 187, 200, 400, 1000)] == [32, 32, 35, 37, 40, 80, 80]
    assert [model.n_selected(k) for k in (32, 35, 80)] == [16, 17, 40]
    with pytest.raises(ValueError, match="A slide with 31 spots cannot give the 32 prototypes"):
        model.n_prototypes(31)
    with pytest.raises(ValueError, match="Pass proto_k_min <= 20"):
        model.build_prototypes(torch.randn(60, 32), torch.tensor([0] * 40 + [1] * 20))
    assert model.proto_bank.shape[0] == 0  # nothing stored when a slide fails validation


def test_build_prototypes_bank_and_selection() -> None:
    model = tiny_mmap()  # K = clip(N // 5, 4, 8)
    feats = blobs(70, 32, 10, seed=2)
    slide = torch.tensor([5] * 30 + [2] * 40)
    ks = model.build_prototypes(feats, slide)
    assert ks == {2: 8, 5: 6}
    assert model.proto_bank.shape == (2, 8, 32)
    assert model.proto_slides.tolist() == [2, 5]
    assert model.proto_mask.sum(1).tolist() == [8, 6]
    # the bank of slide 5 is the seeded K-means of its own features
    expected = kmeans(feats[:30], 6, seed=model.config.proto_seed).centroids
    torch.testing.assert_close(model.proto_bank[1, :6], expected)
    assert model.proto_bank[1, 6:].eq(0).all()
    # each spot gets its own slide's top-L prototypes by cosine, L = K // 2
    f = feats[[0, 45]]
    tokens, key_mask = model._prototype_tokens(f, torch.tensor([5, 2]))
    assert tokens.shape == (2, 1 + 4, 32)
    assert key_mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    for i, (row, k) in enumerate(((1, 6), (0, 8))):
        bank = model.proto_bank[row, :k].numpy()
        fi = f[i].numpy()
        cos = bank @ fi / (np.linalg.norm(bank, axis=1) * np.linalg.norm(fi))
        top = bank[np.argsort(-cos)[: k // 2]]
        np.testing.assert_allclose(tokens[i, 1 : 1 + k // 2].numpy(), top, rtol=1e-6)
        np.testing.assert_allclose(tokens[i, 0].numpy(), fi)
    # rebuilding one slide keeps the other
    model.build_prototypes(feats[30:] + 1, torch.full((40,), 2))
    assert model.proto_slides.tolist() == [5, 2]
    torch.testing.assert_close(model.proto_bank[0, :6], expected)


def test_build_prototypes_errors() -> None:
    model = tiny_mmap()
    with pytest.raises(ValueError, match=r"features of shape \(N, 32\)"):
        model.build_prototypes(torch.randn(40, 16), torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer tensor with one entry per feature row"):
        model.build_prototypes(torch.randn(40, 32), torch.zeros(39, dtype=torch.long))
    model.set_phase(2)
    with pytest.raises(KeyError, match=r"No prototypes for slide\(s\) \[0\]"):
        model({"spot": spots(2), "slide": torch.tensor([0, 0])})
    with pytest.raises(KeyError, match="needs the batch key 'slide'"):
        model({"spot": spots(2)})


def test_masked_padding_is_invariant_to_more_pads() -> None:
    torch.manual_seed(0)
    attn = QueryAttention(16, heads=2, dim_head=4, dropout=0.0)
    tokens = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = attn(tokens, mask)
    padded = torch.cat([tokens, torch.randn(3, 7, 16) * 100], 1)
    out_more = attn(padded, torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1))
    torch.testing.assert_close(out_more, out)
    # masked tokens do not matter; unmasked ones do
    torch.testing.assert_close(attn(tokens.masked_fill(~mask[..., None], 3.0), mask), out)
    assert not torch.allclose(attn(tokens, torch.ones_like(mask)), out)

    # at the model level: a larger proto_k_max (more padded slots) gives the same prediction with masking
    feats, slide = blobs(30, 32, 6, seed=1), torch.zeros(30, dtype=torch.long)
    batch = {"spot": spots(4), "slide": torch.zeros(4, dtype=torch.long)}
    preds = {}
    for padding in ("mask", "zeros"):
        for k_max in (8, 16):
            model = tiny_mmap(proto_k_max=k_max, proto_padding=padding).eval()
            model.build_prototypes(feats, slide)  # K = 6 in both
            model.set_phase(2)
            preds[padding, k_max] = model(batch)["pred"]
    torch.testing.assert_close(preds["mask", 16], preds["mask", 8])
    assert not torch.allclose(preds["zeros", 16], preds["zeros", 8])  # the reference's zero tokens do count


# --------------------------------------------------------------------------- phase 2


def test_phase2_freezes_phase1_and_combines_heads() -> None:
    model = tiny_mmap().eval()
    batch = {"spot": spots(5), "slide": torch.tensor([0, 1, 0, 1, 1])}
    enc = model.encode(batch)
    assert enc["feature"].shape == (5, 32)
    assert enc["pred1"].shape == (5, G)
    model.build_prototypes(blobs(60, 32, 6), torch.tensor([0] * 25 + [1] * 35))
    model.set_phase(2)
    assert model.phase == 2
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"global_attn", "head3"}
    assert not any(p.requires_grad for p in lora_parameters(model.backbone))
    out = model(batch)
    torch.testing.assert_close(out["pred1"], enc["pred1"])
    torch.testing.assert_close(out["pred"], (2 * enc["pred1"] + model.head3(out["fused"])) / 3)
    ref = tiny_mmap(head_weights="reference").eval()
    ref.load_state_dict(model.state_dict())
    assert ref.phase == 2
    out_ref = ref(batch)
    torch.testing.assert_close(out_ref["pred"], 0.5 * enc["pred1"] + 0.5 * ref.head3(out_ref["fused"]))
    # cached features in the batch replace the backbone pass
    cached = model({**batch, **enc})
    torch.testing.assert_close(cached["pred"], out["pred"])
    losses = model.loss(out, {"target": torch.randn(5, G)})
    assert set(losses.extra) == {"align"}
    torch.testing.assert_close(losses.loss, losses.mse + 0.1 * losses.extra["align"])
    with pytest.raises(ValueError, match="Unknown phase 3"):
        model.set_phase(3)


class _Store:
    """The interface of the engine's TensorStore that `prepare_slides` uses (tensors, n, device)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device


def test_prepare_slides_builds_prototypes_and_caches_features() -> None:
    model = tiny_mmap()
    x = spots(50, seed=4)
    slide = torch.tensor([1] * 20 + [0] * 25 + [2] * 5)  # slide 2 is not prepared
    store = _Store({"spot": x, "slide": slide, "target": torch.randn(50, G)})
    groups = [np.arange(0, 20), np.arange(20, 45)]
    model.prepare_slides(store, groups)  # phase 1: nothing to do
    assert set(store.tensors) == {"spot", "slide", "target"}
    model.set_phase(2)
    model.prepare_slides(store, groups, batch_size=16)
    assert model.proto_slides.tolist() == [0, 1]
    assert model.proto_mask.sum(1).tolist() == [5, 4]  # K = clip(25 // 5, 4, 8), clip(20 // 5, 4, 8)
    enc = model.encode({"spot": x[:45]})
    torch.testing.assert_close(store.tensors["feature"][:45], enc["feature"])
    torch.testing.assert_close(store.tensors["pred1"][:45], enc["pred1"])
    assert store.tensors["feature"][45:].isnan().all()
    # the prototypes are the seeded K-means of each slide's encoded features
    expected = kmeans(enc["feature"][20:45], 5, seed=model.config.proto_seed).centroids
    torch.testing.assert_close(model.proto_bank[0, :5], expected)
    # engine batches carry the cached rows; they give the same prediction as recomputing
    rows = torch.tensor([0, 21, 44])
    batch = {k: v[rows] for k, v in store.tensors.items()}
    model.eval()
    torch.testing.assert_close(model(batch)["pred"], model({"spot": x[rows], "slide": slide[rows]})["pred"])
    bad = {k: v[torch.tensor([0, 46])] for k, v in store.tensors.items()}
    with pytest.raises(ValueError, match="cached 'feature' rows are missing"):
        model(bad)
    with pytest.raises(KeyError, match=r"needs the store entries \['slide'\]"):
        model.prepare_slides(_Store({"spot": x}), groups)


def test_encode_is_deterministic_and_restores_mode() -> None:
    model = tiny_mmap().train()
    batch = {"spot": spots(3)}
    a, b = model.encode(batch), model.encode(batch)
    torch.testing.assert_close(a["feature"], b["feature"])
    assert model.training
    assert model.local_attn.dropout.training
    assert not a["feature"].requires_grad


def test_state_dict_round_trip_keeps_bank_and_phase() -> None:
    model = tiny_mmap(seed=1).eval()
    model.build_prototypes(blobs(50, 32, 5), torch.tensor([3] * 50))
    model.set_phase(2)
    fresh = tiny_mmap(seed=2).eval()
    fresh.load_state_dict(model.state_dict())
    assert fresh.phase == 2
    assert fresh.proto_slides.tolist() == [3]
    assert {n.split(".")[0] for n, p in fresh.named_parameters() if p.requires_grad} == {"global_attn", "head3"}
    batch = {"spot": spots(3), "slide": torch.tensor([3, 3, 3])}
    torch.testing.assert_close(fresh(batch)["pred"], model(batch)["pred"])


# --------------------------------------------------------------------------- config and errors


def test_config_defaults_and_errors(tmp_path) -> None:
    cfg = MMAPConfig(10)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_blocks) == (16, 32.0, 0.0, 9)
    assert (cfg.mag_loss_weight, cfg.align_weight, cfg.proto_k_min, cfg.proto_k_max) == (0.1, 0.1, 32, 80)
    assert cfg.train == TrainDefaults(lr=1e-5, weight_decay=0.0, min_lr=1e-6, max_epochs=50, batch_size=16)
    assert MMAPConfig(10, train={"lr": 1e-4}).train.lr == 1e-4
    with pytest.raises(ValueError, match="Unknown mag_loss 'l2'"):
        MMAPConfig(10, mag_loss="l2")
    with pytest.raises(ValueError, match="Unknown head_weights 'median'"):
        MMAPConfig(10, head_weights="median")
    with pytest.raises(ValueError, match="Unknown proto_padding 'none'"):
        MMAPConfig(10, proto_padding="none")
    with pytest.raises(ValueError, match="Unknown backbone 'resnet18'"):
        MMAPConfig(10, backbone="resnet18")
    with pytest.raises(ValueError, match="Unknown phase 3"):
        MMAPConfig(10, phase=3)
    with pytest.raises(ValueError, match="`n_genes` to be positive"):
        MMAPConfig(0)
    with pytest.raises(ValueError, match="1 <= `proto_k_min` <= `proto_k_max`"):
        MMAPConfig(10, proto_k_min=90)
    with pytest.raises(ValueError, match=r"`attn_dropout` in \[0, 1\)"):
        MMAPConfig(10, attn_dropout=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_r'"):
        MMAP(10, lora_r=8)
    with pytest.raises(ValueError, match="`lora_blocks`=9 exceeds the depth 2"):
        MMAP(10, **{**TINY, "lora_blocks": 9})
    with pytest.raises(FileNotFoundError, match="No ViT weights file"):
        MMAP(10, **TINY, backbone_weights=str(tmp_path / "uni.bin"))


def test_backbone_weights_are_loaded(tmp_path) -> None:
    torch.manual_seed(5)
    vit = VisionTransformer(**VIT, init_values=1e-5)
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    model = tiny_mmap(backbone_kwargs={**VIT, "init_values": 1e-5}, backbone_weights=str(path))
    state = model.backbone.state_dict()
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(state[key], value)


# --------------------------------------------------------------------------- tiny fit


def test_tiny_fit_reduces_loss_in_both_phases() -> None:
    model = tiny_mmap(attn_dropout=0.0, augment=False)
    n = 24
    x = spots(n, seed=3)
    target = torch.randn(n, G) * 0.5 + x.float().mean((1, 2, 3))[:, None] / 255
    slide = torch.tensor([0] * 12 + [1] * 12)

    def run(steps: int) -> tuple[float, float]:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        batch = {"spot": x, "slide": slide, "target": target}
        losses = []
        for step in range(steps):
            model.train()
            batch = model.augment(batch, step / steps)
            loss = model.loss(model(batch), batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses[0], losses[-1]

    first, last = run(25)
    assert last < 0.6 * first
    model.eval()
    model.build_prototypes(model.encode({"spot": x})["feature"], slide)
    model.set_phase(2)
    first2, last2 = run(25)
    assert last2 < 0.8 * first2


@pytest.mark.gpu
def test_gpu_bf16_both_phases_and_kmeans() -> None:
    device = torch.device("cuda")
    model = tiny_mmap().to(device)
    x = spots(8).to(device)
    batch = {"spot": x, "target": torch.randn(8, G, device=device), "slide": torch.zeros(8, dtype=torch.long)}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model.loss(model.train()(model.augment(batch, 0.5)), batch)
    losses.loss.backward()
    feats = blobs(40, 32, 5).to(device)
    assert model.build_prototypes(feats, torch.zeros(40, dtype=torch.long)) == {0: 8}
    assert model.proto_bank.device.type == "cuda"
    res = kmeans(feats, 8, seed=42)
    assert res.labels.device.type == "cuda"
    assert res.inertia == pytest.approx(float(((feats - res.centroids[res.labels]) ** 2).sum()), rel=1e-3)
    model.set_phase(2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.eval()({**batch, "slide": batch["slide"].to(device)})
    assert torch.isfinite(out["pred"].float()).all()
