"""A tiny two-phase model for the resume tests: every hook that touches the RNG or the store is exercised.

Phase 1 trains a small conv net with dropout and noise augmentation; phase 2 freezes it and trains a second head
on a per-slide random projection that ``prepare_slides`` draws from the global RNG and caches in the store (as
MMAP caches phase-1 features), so that a resumed phase 2 only matches when the RNG state is restored too. The
projection is a buffer, so prediction (and a saved predictor) reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stpred.models import StpredModel, TrainDefaults, register_model

NAME = "resume_two_phase"


@dataclass(frozen=True)
class TwoPhaseConfig:
    n_genes: int
    train: TrainDefaults = field(default_factory=lambda: TrainDefaults(lr=1e-2, max_epochs=3, batch_size=8))


class TwoPhase(StpredModel):
    """Conv features + head (phase 1), then a second head on cached, randomly projected features (phase 2)."""

    inputs = ("spot", "slide")
    phases = (1, 2)

    def __init__(self, n_genes: int, **options) -> None:
        super().__init__()
        self.config = TwoPhaseConfig(n_genes, **options)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(0.3)
        self.head1 = nn.Linear(4, n_genes)
        self.head2 = nn.Linear(4, n_genes)
        self.register_buffer("current_phase", torch.tensor(1))
        self.register_buffer("projection", torch.zeros(4, 4))

    def set_phase(self, phase: int) -> None:
        self.current_phase.fill_(phase)
        for p in self.parameters():
            p.requires_grad_(requires_grad=False)
        for p in (self.body if phase == 1 else self.head2).parameters():
            p.requires_grad_(requires_grad=True)
        if phase == 1:
            for p in self.head1.parameters():
                p.requires_grad_(requires_grad=True)

    def prepare_slides(self, store, groups) -> None:
        if int(self.current_phase) != 2:
            return
        with torch.no_grad():
            if "target" in store.tensors:  # training: draw the projection from the global RNG, on purpose
                self.projection.copy_(torch.randn(4, 4))
            feats = self.body(store.tensors["spot"].float() / 255.0)
            store.tensors["projected"] = feats @ self.projection

    def augment(self, batch, progress):
        if int(self.current_phase) == 1:
            noise = torch.randint(-8, 9, batch["spot"].shape, dtype=torch.int16)
            batch = {**batch, "spot": (batch["spot"].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)}
        return batch

    def forward(self, batch):
        if int(self.current_phase) == 1 or "projected" not in batch:
            return {"pred": self.head1(self.drop(self.body(batch["spot"].float() / 255.0)))}
        return {"pred": self.head2(self.drop(batch["projected"]))}


def register_two_phase() -> None:
    """Register :class:`TwoPhase` under ``NAME`` (once per process)."""
    from stpred.models import get_model

    try:
        get_model(NAME)
    except (KeyError, ValueError):
        register_model(NAME)(TwoPhase)
