"""Checks every built-in model passes: registry, config errors, finite output, gradients on trainable weights."""

from __future__ import annotations

import pytest
import torch

from stpred.models import get_model, list_models
from stpred.models.hifusion import TINY_CONFIG as HIFUSION_TINY

BUILTIN = ["hifusion", "hist", "mmap"]
TINY = {
    "hifusion": HIFUSION_TINY,
    "hist": {"width": 32, "heads": 2},
    "mmap": {
        "backbone": "vit",
        "backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "lora_blocks": 2,
        "lora_rank": 4,
        "attn_heads": 2,
        "attn_dim_head": 8,
    },
}
N_GENES, IN_DIM, N = 5, 16, 12


def tiny_model(name: str) -> torch.nn.Module:
    cls = get_model(name)
    torch.manual_seed(0)
    if name == "hist":
        return cls(IN_DIM, N_GENES, **TINY[name])
    return cls(N_GENES, **TINY[name])


def fake_batch(model: torch.nn.Module, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    batch: dict[str, torch.Tensor] = {"target": torch.randn(n, N_GENES, generator=g)}
    for key in model.inputs:
        if key == "spot":
            size = getattr(cfg, "spot_size", 32)
            batch[key] = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        elif key == "context":
            size = cfg.context_size
            batch[key] = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        elif key == "embedding":
            batch[key] = torch.randn(n, IN_DIM, generator=g)
        elif key == "coords":
            batch[key] = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij"), -1).reshape(-1, 2)
        elif key == "slide":
            batch[key] = torch.zeros(n, dtype=torch.long)
    return batch


def test_builtin_models_are_registered():
    assert set(BUILTIN) <= set(list_models())
    for name in BUILTIN:
        cls = get_model(name.upper())
        assert cls.name == name
        assert cls.batching in ("spots", "slide")


@pytest.mark.parametrize("name", BUILTIN)
def test_backward_reaches_every_trainable_parameter(name):
    model = tiny_model(name).train()
    batch = fake_batch(model)
    out = model(batch)
    assert out["pred"].shape == (N, N_GENES)
    assert torch.isfinite(out["pred"]).all()
    losses = model.loss(out, batch)
    assert losses["loss"].ndim == 0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", BUILTIN)
def test_unknown_config_key_is_rejected(name):
    cls = get_model(name)
    args = (IN_DIM, N_GENES) if name == "hist" else (N_GENES,)
    with pytest.raises((TypeError, ValueError), match="not_an_option"):
        cls(*args, not_an_option=1)


@pytest.mark.parametrize("name", BUILTIN)
def test_train_defaults_are_declared(name):
    model = tiny_model(name)
    train = model.config.train
    assert train.lr > 0
    assert train.max_epochs > 0
    assert train.batch_size > 0
    assert train.optimizer in ("adam", "adamw")
