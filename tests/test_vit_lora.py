from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stpred.models.encoders.lora import (
    LoRALinear,
    MultiLoRALinear,
    active_adapter,
    inject_lora,
    lora_parameters,
    merge_lora,
)
from stpred.models.encoders.vit import (
    VisionTransformer,
    create_vit,
    from_checkpoint,
    resample_pos_embed,
    vit_large_patch16_224,
)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY, **kw}).eval()


def _randomize(module: nn.Module, seed: int = 1) -> None:
    """Give every parameter (LayerScale, norms, LoRA B) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))


def _manual_vit(state: dict[str, torch.Tensor], x: torch.Tensor, *, depth: int, heads: int, patch: int):
    """An independent ViT forward from a timm-named state dict (explicit softmax attention, no SDPA)."""
    w = state["patch_embed.proj.weight"]
    d = w.shape[0]
    b = x.shape[0]
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, gh, gw, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, w[0].numel())
    t = patches @ w.reshape(d, -1).T + state["patch_embed.proj.bias"]
    t = torch.cat([state["cls_token"].expand(b, -1, -1), t], 1) + state["pos_embed"]

    def ln(z, name):
        return F.layer_norm(z, (d,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        h = ln(t, p + "norm1")
        qkv = h @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        a = a.transpose(1, 2).reshape(b, -1, d) @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        t = t + a * state.get(p + "ls1.gamma", torch.ones(d))
        h = ln(t, p + "norm2")
        h = F.gelu(h @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        h = h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        t = t + h * state.get(p + "ls2.gamma", torch.ones(d))
    return ln(t, "norm")


# --------------------------------------------------------------------------- ViT


def test_vit_shapes_and_cls_token() -> None:
    vit = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    tokens = vit.forward_features(x)
    assert tokens.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(vit(x), tokens[:, 0])


@pytest.mark.parametrize("init_values", [None, 1e-5])
def test_vit_matches_independent_forward(init_values: float | None) -> None:
    vit = tiny_vit(init_values=init_values)
    _randomize(vit)
    x = torch.randn(2, 3, 32, 32)
    expected = _manual_vit(vit.state_dict(), x, depth=2, heads=2, patch=8)
    torch.testing.assert_close(vit.forward_features(x), expected, atol=1e-4, rtol=1e-4)


def test_timm_state_dict_names() -> None:
    vit = tiny_vit(init_values=1e-5)
    per_block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    ]
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    expected |= {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    assert set(vit.state_dict()) == expected
    assert vit.state_dict()["blocks.0.ls1.gamma"].eq(1e-5).all()
    with_head = tiny_vit(num_classes=4)
    assert {"head.weight", "head.bias"} <= set(with_head.state_dict())
    assert with_head(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_vit_large_architecture() -> None:
    with torch.device("meta"):
        vit = vit_large_patch16_224(init_values=1e-5)
    assert (vit.embed_dim, vit.depth, vit.num_heads) == (1024, 24, 16)
    assert tuple(vit.pos_embed.shape) == (1, 197, 1024)
    assert sum(p.numel() for p in vit.parameters()) == pytest.approx(303.35e6, rel=1e-3)


def test_pos_embed_interpolation() -> None:
    vit = tiny_vit()
    assert vit.forward_features(torch.randn(2, 3, 48, 32)).shape == (2, 1 + 6 * 4, 32)
    assert resample_pos_embed(vit.pos_embed, (4, 4)) is vit.pos_embed
    const = torch.cat([torch.zeros(1, 1, 5), torch.full((1, 16, 5), 0.7)], 1)
    out = resample_pos_embed(const, (6, 3))
    assert out.shape == (1, 19, 5)
    torch.testing.assert_close(out[:, 1:], torch.full((1, 18, 5), 0.7))
    with pytest.raises(ValueError, match="square position-embedding grid"):
        resample_pos_embed(torch.zeros(1, 1 + 15, 5), (4, 4))


def test_vit_errors() -> None:
    with pytest.raises(ValueError, match="divisible by the patch size"):
        VisionTransformer(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        VisionTransformer(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="Expected `depth` to be at least 1"):
        VisionTransformer(**{**TINY, "depth": 0})
    vit = tiny_vit()
    with pytest.raises(ValueError, match="divisible by the patch size 8, found 30×32"):
        vit(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        vit(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="Unknown ViT architecture 'vit_huge'"):
        create_vit("vit_huge")


def test_vit_bf16_autocast() -> None:
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), vit(x), atol=0.1, rtol=0.1)


# --------------------------------------------------------------------------- checkpoints


def test_from_checkpoint_loads_timm_file_strictly(tmp_path) -> None:
    src = tiny_vit(seed=3, init_values=1e-5)
    _randomize(src, seed=4)
    path = tmp_path / "uni_like.bin"
    torch.save({k: v.clone() for k, v in src.state_dict().items()}, path)
    vit = from_checkpoint(path, arch="vit", **TINY, init_values=1e-5)
    assert not vit.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(x), src(x))
    # nested under "model" and with DDP prefixes: still accepted
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    torch.testing.assert_close(from_checkpoint(path, arch="vit", **TINY, init_values=1e-5)(x), src(x))
    # a checkpoint for 32 px loads into a 48 px model by resampling pos_embed
    torch.save(src.state_dict(), path)
    big = from_checkpoint(path, arch="vit", **{**TINY, "img_size": 48}, init_values=1e-5)
    assert big.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(big.pos_embed[:, 0], src.pos_embed[:, 0])


def test_from_checkpoint_rejects_wrong_files(tmp_path) -> None:
    src = tiny_vit(init_values=1e-5)
    state = dict(src.state_dict())
    path = tmp_path / "w.pt"
    with pytest.raises(FileNotFoundError, match="No ViT weights file"):
        from_checkpoint(tmp_path / "missing.pt", arch="vit", **TINY)
    # LayerScale in the file but not in the model
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(first: \['blocks.0.ls1.gamma'"):
        from_checkpoint(path, arch="vit", **TINY)
    # a renamed key
    state["blocks.1.attn.qkv_renamed.weight"] = state.pop("blocks.1.attn.qkv.weight")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \(first: \['blocks.1.attn.qkv.weight'"):
        from_checkpoint(path, arch="vit", **TINY, init_values=1e-5)
    # wrong width
    torch.save(tiny_vit(embed_dim=16, init_values=1e-5).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatches"):
        from_checkpoint(path, arch="vit", **TINY, init_values=1e-5)


# --------------------------------------------------------------------------- LoRA


def test_lora_linear_zero_init_merge_and_grad() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    assert layer.weight is base.weight
    assert layer.scaling == 2.0
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ base.weight.T + base.bias)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    layer(x).sum().backward()
    assert base.weight.grad is None
    assert layer.lora_A.grad is not None
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_lora_errors() -> None:
    with pytest.raises(TypeError, match="LoRA wraps an `nn.Linear`, found Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="already carries LoRA adapters"):
        LoRALinear(LoRALinear(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="`rank` to be a positive integer"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match=r"`dropout` in \[0, 1\)"):
        LoRALinear(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(ValueError, match="between 1 and the depth 2"):
        inject_lora(tiny_vit(), n_blocks=3)
    with pytest.raises(TypeError, match="a `blocks` attribute"):
        inject_lora(nn.Linear(3, 3), n_blocks=1)
    with pytest.raises(ValueError, match="no linear layer 'attn.qkv_x'"):
        inject_lora(tiny_vit(), n_blocks=1, targets=("attn.qkv_x",))
    multi = MultiLoRALinear(nn.Linear(4, 4), n_adapters=3, rank=2)
    with pytest.raises(ValueError, match="leading size divisible by 3"):
        multi(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"adapter index in \[0, 3\)"):
        multi.merge(3)


def test_inject_lora_only_adapters_train() -> None:
    vit = tiny_vit()
    ref = copy.deepcopy(vit)
    names = inject_lora(vit, n_blocks=1, rank=4, alpha=8)
    assert names == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert isinstance(vit.blocks[1].attn.qkv, LoRALinear)
    assert type(vit.blocks[0].attn.qkv) is nn.Linear
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.1.attn.{t}.lora_{m}" for t in ("qkv", "proj") for m in "AB"}
    assert len(list(lora_parameters(vit))) == 4
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(x), ref(x))  # B = 0 at init
    # base weights keep their timm names (a checkpoint loads into the injected model once lora_* are ignored)
    assert {k for k in vit.state_dict() if "lora" not in k} == set(ref.state_dict())


def test_merged_vit_equals_adapted_vit() -> None:
    vit = tiny_vit()
    inject_lora(vit, n_blocks=2, rank=4, alpha=8)
    _randomize_lora(vit)
    x = torch.randn(2, 3, 32, 32)
    before = vit(x)
    merge_lora(vit)
    assert not any(isinstance(m, LoRALinear) for m in vit.modules())
    torch.testing.assert_close(vit(x), before, atol=1e-5, rtol=1e-5)


def _randomize_lora(vit: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(vit):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_shared_backbone_three_adapters_equals_three_copies() -> None:
    base = tiny_vit(init_values=1e-3)
    shared = copy.deepcopy(base)
    inject_lora(shared, n_blocks=2, rank=4, alpha=8, n_adapters=3)
    _randomize_lora(shared)
    views = torch.randn(3, 2, 3, 32, 32)  # (view, B, C, H, W)
    out = shared.forward_features(views.flatten(0, 1)).unflatten(0, (3, 2))
    for v in range(3):
        copy_v = copy.deepcopy(base)
        inject_lora(copy_v, n_blocks=2, rank=4, alpha=8, n_adapters=1)
        with torch.no_grad():
            for name, m in copy_v.named_modules():
                if isinstance(m, LoRALinear):
                    src = shared.get_submodule(name)
                    m.lora_A.copy_(src.lora_A[v])
                    m.lora_B.copy_(src.lora_B[v])
        expected = copy_v.forward_features(views[v])
        torch.testing.assert_close(out[v], expected, atol=1e-5, rtol=1e-5)
        with active_adapter(shared, v):  # one adapter for every row
            torch.testing.assert_close(shared.forward_features(views[v]), expected, atol=1e-5, rtol=1e-5)
        merged = merge_lora(copy.deepcopy(shared), adapter=v)
        torch.testing.assert_close(merged.forward_features(views[v]), expected, atol=1e-5, rtol=1e-5)
    assert all(m.active is None for m in shared.modules() if isinstance(m, MultiLoRALinear))
    # gradients reach each view's adapter and nothing else
    shared.forward_features(views.flatten(0, 1)).sum().backward()
    grads = {n: p.grad for n, p in shared.named_parameters()}
    assert all((g is not None) == ("lora" in n) for n, g in grads.items())
