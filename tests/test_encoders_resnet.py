from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stpred.models.encoders._weights import load_weights
from stpred.models.encoders.resnet import BasicBlock, Bottleneck, ResNet, resnet10, resnet18, resnet34, resnet50


def _torchvision_keys(layers: tuple[int, ...], *, fc: bool) -> set[str]:
    """The state-dict names torchvision's ResNet (BasicBlock) uses, written out from its naming rules."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in bn}
    for stage, n in enumerate(layers, start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            keys |= {f"{p}.bn1.{s}" for s in bn} | {f"{p}.bn2.{s}" for s in bn}
            if stage > 1 and b == 0:
                keys |= {f"{p}.downsample.0.weight"} | {f"{p}.downsample.1.{s}" for s in bn}
    if fc:
        keys |= {"fc.weight", "fc.bias"}
    return keys


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_state_dict_names_match_torchvision():
    assert set(resnet18(num_classes=1000, width=4).state_dict()) == _torchvision_keys((2, 2, 2, 2), fc=True)
    assert set(resnet10(width=4).state_dict()) == _torchvision_keys((1, 1, 1, 1), fc=False)
    assert set(resnet34(width=4).state_dict()) == _torchvision_keys((3, 4, 6, 3), fc=False)


def test_parameter_counts_match_torchvision():
    # torchvision: resnet18 11,689,512 and resnet34 21,797,672 parameters with the 1000-class fc
    assert _n_params(resnet18(num_classes=1000)) == 11_689_512
    assert _n_params(resnet34(num_classes=1000)) == 21_797_672
    assert _n_params(resnet18()) == 11_176_512
    assert _n_params(resnet10()) == 4_905_792


def _torchvision_bottleneck_keys() -> set[str]:
    """torchvision's ResNet-50 state-dict names (Bottleneck: conv1..3/bn1..3, downsample on each stage's block 0)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{s}" for s in bn}
    for stage, n in enumerate((3, 4, 6, 3), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            for i in (1, 2, 3):
                keys |= {f"{p}.conv{i}.weight"} | {f"{p}.bn{i}.{s}" for s in bn}
            if b == 0:  # stage 1 too: 64 → 256 channels
                keys |= {f"{p}.downsample.0.weight"} | {f"{p}.downsample.1.{s}" for s in bn}
    return keys


def test_resnet50_matches_torchvision_layout_and_size():
    with torch.device("meta"):
        full = resnet50(num_classes=1000)
    assert set(full.state_dict()) == _torchvision_bottleneck_keys()
    # torchvision ResNet50_Weights.IMAGENET1K_V1 meta: 25,557,032 parameters
    assert _n_params(full) == 25_557_032
    assert full.num_features == 2048
    state = full.state_dict()
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3×3 conv (v1.5)
    assert full.layer2[0].conv2.stride == (2, 2)
    assert full.layer2[0].conv1.stride == (1, 1)
    torch.manual_seed(0)
    m = resnet50(width=4).eval()
    assert isinstance(m.layer1[0], Bottleneck)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 128)
    with pytest.raises(ValueError, match="`block`"):
        ResNet((1, 1, 1, 1), block="wide")


def test_shapes_and_pooling():
    torch.manual_seed(0)
    m = resnet18(width=4).eval()
    x = torch.randn(2, 3, 64, 48)
    f = m.forward_features(x)
    assert f.shape == (2, 32, 2, 2)
    assert m.num_features == 32
    torch.testing.assert_close(m(x), f.mean(dim=(2, 3)))
    # 224 → 7, 112 → 4, 32 → 1: the feature map is the input side / 32, rounded up
    assert m.forward_features(torch.randn(1, 3, 112, 112)).shape[-1] == 4
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 1
    head = resnet10(width=4, num_classes=5).eval()
    assert head(x).shape == (2, 5)


def test_block_is_residual():
    block = BasicBlock(4, 4).eval()
    torch.nn.init.zeros_(block.bn2.weight)
    x = torch.rand(1, 4, 5, 5)
    torch.testing.assert_close(block(x), F.relu(x))


def test_init_like_torchvision():
    torch.manual_seed(0)
    m = resnet18(zero_init_residual=True, width=16)
    assert torch.all(m.layer1[0].bn2.weight == 0)
    assert torch.all(m.bn1.weight == 1)
    assert torch.all(m.bn1.bias == 0)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_ch * k * k))
    w = m.layer4[0].conv2.weight
    assert abs(w.std().item() - (2 / (128 * 9)) ** 0.5) < 0.05 * (2 / (128 * 9)) ** 0.5


def test_channels_last_same_result():
    torch.manual_seed(0)
    m = resnet18(width=4).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = m.forward_features(x)
    m.to(memory_format=torch.channels_last)
    out = m.forward_features(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bad_layers():
    with pytest.raises(ValueError, match="4 positive block counts"):
        ResNet((2, 2, 2))
    with pytest.raises(ValueError, match="positive `width`"):
        ResNet(width=0)


def test_load_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    src = resnet18(num_classes=1000)  # full torchvision layout, ImageNet-style fc included
    with torch.no_grad():
        for buf in src.buffers():
            buf.add_(1)  # make the BatchNorm running stats distinguishable from a fresh init
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    dst = resnet18()  # no fc: the file's fc is dropped
    load_weights(dst, path)
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k], msg=k)
    # the factory loads the same file
    torch.testing.assert_close(resnet18(weights=path).conv1.weight, src.conv1.weight)


def test_load_wrapped_and_prefixed(tmp_path):
    src = resnet10(width=4)
    path = tmp_path / "ckpt.pt"
    state = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    dst = resnet10(width=4)
    load_weights(dst, path)
    torch.testing.assert_close(dst.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    torch.save({"model": src.state_dict()}, path)
    load_weights(resnet10(width=4), path)


def test_load_translate_and_ignore(tmp_path):
    src = resnet10(width=4)
    path = tmp_path / "foreign.pt"
    foreign = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    foreign["proj.weight"] = torch.zeros(3)
    torch.save(foreign, path)
    dst = resnet10(width=4)
    with pytest.raises(ValueError, match=r"unexpected keys .*backbone\.conv1\.weight"):
        load_weights(dst, path)
    load_weights(
        dst, path, translate=lambda s: {k.removeprefix("backbone."): v for k, v in s.items()}, ignore=["proj.*"]
    )
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)


def test_load_tolerates_missing_num_batches_tracked(tmp_path):
    src = resnet10(width=4)
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    load_weights(resnet10(width=4), path)


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(resnet18(width=4), missing)

    path = tmp_path / "r10.pt"
    torch.save(resnet10(width=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys \(first: \['layer1\.1\.conv1\.weight'"):
        load_weights(resnet18(width=4), path)
    with pytest.raises(ValueError, match=r"shape mismatches \(first: \['conv1\.weight: file \(4, 3, 7, 7\) vs module"):
        load_weights(resnet10(width=8), path)
    # a module with an fc needs the fc from the file
    with pytest.raises(ValueError, match=r"missing keys .*fc\.weight"):
        load_weights(resnet10(width=4, num_classes=3), path)

    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="could not be read as a torch state dict"):
        load_weights(resnet10(width=4), text)

    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_weights(resnet10(width=4), listed)

    mixed = tmp_path / "mixed.pt"
    torch.save({"conv1.weight": torch.zeros(1), "lr": 0.1}, mixed)
    with pytest.raises(ValueError, match=r"not `str -> Tensor` \(first: \['lr'\]\)"):
        load_weights(resnet10(width=4), mixed)
