"""What every stpred model declares so that one engine can train it.

A model is a plain :class:`torch.nn.Module` with:

``name``
    Set by :func:`~stpred.models.register_model`.
``inputs``
    Batch keys (see :class:`stpred._constants.BatchKeys`) the engine must supply, e.g. ``("spot", "context")``.
``batching``
    ``"spots"`` (mini-batches of spots drawn across slides) or ``"slide"`` (one whole slide per step).
``config``
    A frozen dataclass holding every hyper-parameter, including a :class:`TrainDefaults` under ``train``.
``forward(batch) -> dict``
    Must contain ``"pred"``: ``(B, n_genes)`` normalised expression.
``loss(out, batch) -> dict``
    Must contain ``"loss"`` (scalar); other entries (scalars) are logged.
``augment(batch, progress) -> batch`` (optional)
    Training-time augmentation run on the device; ``progress`` is the fraction of training done in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainDefaults:
    """Optimisation defaults a model declares; :func:`stpred.tl.fit` arguments override them."""

    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: Literal["adam", "adamw"] = "adam"
    scheduler: Literal["cosine", "none"] = "cosine"
    min_lr: float = 1e-6
    max_epochs: int = 50
    batch_size: int = 32
