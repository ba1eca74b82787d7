"""Checks every built-in model passes: registry, config errors, finite output, gradients on trainable weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stpred.models import LossOutput, StpredModel, TrainDefaults, get_model, list_models
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


def tiny_model(name: str) -> StpredModel:
    cls = get_model(name)
    torch.manual_seed(0)
    return cls.from_sizes({"n_genes": N_GENES, "in_dim": IN_DIM}, **TINY[name])


def fake_batch(model: torch.nn.Module, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch: dict[str, torch.Tensor] = {"target": torch.randn(n, N_GENES, generator=g)}
    for key in model.inputs:
        if key == "spot":
            size = model.crop_sizes[0] or 32
            batch[key] = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        elif key == "context":
            size = model.crop_sizes[1]
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
        assert issubclass(cls, StpredModel)


@pytest.mark.parametrize("name", BUILTIN)
def test_built_from_declared_data_sizes(name):
    model = tiny_model(name)
    # the model records exactly the sizes it declares, and rebuilding from them gives the same shapes
    assert model.sizes() == {k: {"n_genes": N_GENES, "in_dim": IN_DIM}[k] for k in model.data_sizes}
    again = type(model).from_sizes(model.sizes(), **TINY[name])
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs the data sizes"):
        type(model).from_sizes({}, **TINY[name])


@pytest.mark.parametrize("name", BUILTIN)
def test_backward_reaches_every_trainable_parameter(name):
    model = tiny_model(name).train()
    batch = fake_batch(model)
    out = model(batch)
    assert out["pred"].shape == (N, N_GENES)
    assert torch.isfinite(out["pred"]).all()
    losses = model.loss(out, batch)
    assert isinstance(losses, LossOutput)
    # `mse` is the MSE of the final prediction, whatever auxiliary terms the loss adds
    torch.testing.assert_close(losses.mse, F.mse_loss(out["pred"].float(), batch["target"]).detach())
    assert losses.loss.ndim == 0
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", BUILTIN)
def test_unknown_config_key_is_rejected(name):
    cls = get_model(name)
    args = (IN_DIM, N_GENES) if name == "hist" else (N_GENES,)
    with pytest.raises((TypeError, ValueError), match="not_an_option"):
        cls(*args, not_an_option=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", float("nan")), ("lr", 0.0), ("max_epochs", 1.5), ("batch_size", True), ("optimizer", "sgd"),
     ("weight_decay", -1.0), ("early_stopping_patience", 0), ("batch_per_section", "yes")],
)
def test_train_defaults_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainDefaults(**{field: value})


def test_train_defaults_accept_numpy_ints():
    import numpy as np

    plan = TrainDefaults(max_epochs=np.int64(3), batch_size=np.int32(8))
    assert plan.max_epochs == 3
    assert type(plan.max_epochs) is int
    assert type(plan.batch_size) is int
