"""Out-of-distribution scores: Mahalanobis distance of a spot's image features from the training spots.

The reference (mean and shrunk precision of the training spots' features, and the score quantile on the
validation split) is fitted once by :func:`stpred.tl.fit` and travels with the predictor (``ood.npz``).
Covariance shrinkage follows Ledoit & Wolf (2004, "A well-conditioned estimator for large-dimensional covariance
matrices", J. Multivariate Anal. 88, Lemma 3.2 and Theorem 3.1), so that a few hundred spots suffice for
hundreds of feature dimensions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..models import StpredModel
    from ..train import TensorStore

logger = logging.getLogger(__name__)

_FILE = "ood.npz"
#: Quantile of the validation scores above which a spot is flagged.
QUANTILE = 0.99
#: At most this many training spots enter the covariance (drawn with the fit's seed).
MAX_REFERENCE_SPOTS = 20_000


@dataclass
class OODReference:
    """Training-feature statistics of a predictor and the flagging threshold.

    Attributes
    ----------
    mean
        ``(D,)`` mean training feature.
    precision
        ``(D, D)`` inverse of the Ledoit–Wolf shrunk covariance of the training features.
    threshold
        Score quantile ``quantile`` of the validation spots (the training spots when there is no validation
        split; ``calibrated_on`` says which).
    quantile
        The quantile used for ``threshold``.
    shrinkage
        Ledoit–Wolf shrinkage intensity in [0, 1].
    n_reference, n_calibration
        Spots used for the statistics and for the threshold.
    calibrated_on
        ``"validation"`` or ``"train"``.
    """

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float
    shrinkage: float
    n_reference: int
    n_calibration: int
    calibrated_on: str

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance ``sqrt((x - mean)ᵀ P (x - mean))`` of each row of ``features`` ``(n, D)``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            msg = f"Expected features of shape (n, {self.mean.shape[0]}), found {x.shape}."
            raise ValueError(msg)
        d = x - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0)).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no arrays), recorded in provenance."""
        return {
            "method": "mahalanobis",
            "dim": int(self.mean.shape[0]),
            "threshold": float(self.threshold),
            "quantile": float(self.quantile),
            "shrinkage": float(self.shrinkage),
            "n_reference": int(self.n_reference),
            "n_calibration": int(self.n_calibration),
            "calibrated_on": self.calibrated_on,
        }


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance ``(1 - s) S + s μ I`` of the rows of ``x`` ``(n, D)`` and the intensity ``s``.

    ``S`` is the (biased) sample covariance and ``μ = tr(S) / D``; ``s`` is Ledoit & Wolf's (2004) estimate of
    the optimal intensity, clipped to [0, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    xc = x - x.mean(0)
    cov = xc.T @ xc / n
    mu = float(np.trace(cov)) / p
    delta = float(((cov - mu * np.eye(p)) ** 2).sum())  # ‖S − μI‖²
    sq = xc**2
    beta = float((sq.T @ sq).sum()) / n - float((cov**2).sum())  # n · mean ‖x xᵀ − S‖² ...
    beta = max(beta / n, 0.0)  # ... divided by n: the estimate of E‖S − Σ‖²
    shrink = 0.0 if delta <= 0 else min(beta / delta, 1.0)
    return (1.0 - shrink) * cov + shrink * mu * np.eye(p), shrink


def fit_reference(
    train_features: np.ndarray, calibration_features: np.ndarray | None, *, quantile: float = QUANTILE
) -> OODReference:
    """Fit the reference on training features and the threshold on calibration (validation) features."""
    cov, shrink = ledoit_wolf(train_features)
    scale = float(np.trace(cov)) / cov.shape[0]
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    # constant features (zero variance) would make the covariance singular: a tiny ridge relative to its scale
    precision = np.linalg.inv(cov + 1e-6 * scale * np.eye(cov.shape[0]))
    ref = OODReference(
        mean=np.asarray(train_features, np.float64).mean(0),
        precision=precision,
        threshold=float("nan"),
        quantile=quantile,
        shrinkage=shrink,
        n_reference=len(train_features),
        n_calibration=0,
        calibrated_on="validation",
    )
    calib = calibration_features
    if calib is None or len(calib) == 0:
        calib, ref.calibrated_on = train_features, "train"
    scores = ref.score(calib)
    ref.threshold = float(np.quantile(scores, quantile))
    ref.n_calibration = len(calib)
    return ref


def reference_from_fit(
    model: StpredModel,
    store: TensorStore,
    train_groups: Sequence[np.ndarray],
    val_groups: Sequence[np.ndarray],
    *,
    seed: int = 0,
    batch_size: int = 64,
) -> OODReference | None:
    """The OOD reference of a freshly trained model (``None`` when the model does not implement ``features``)."""
    from ..train._trainer import run_inference
    from ._infer import _FeatureView

    def features(groups: Sequence[np.ndarray]) -> np.ndarray | None:
        groups = [np.asarray(g) for g in groups if len(g)]
        if not groups:
            return None
        return run_inference(_FeatureView(model), store, groups, batch_size=batch_size)

    from ..models._base import StpredModel

    if type(model).features is StpredModel.features:
        logger.info("%s does not implement `features`; no out-of-distribution reference.", type(model).__name__)
        return None
    try:
        train_groups = _subsample(train_groups, MAX_REFERENCE_SPOTS, seed, model.batching)
        train = features(train_groups)
        if train is None:
            return None
        return fit_reference(train, features(val_groups))
    finally:
        model.to("cpu")
        model.eval()


def _subsample(groups: Sequence[np.ndarray], limit: int, seed: int, batching: str) -> list[np.ndarray]:
    """At most ``limit`` rows of ``groups`` (whole groups kept for slide-batched models, whose features need them)."""
    total = sum(len(g) for g in groups)
    if total <= limit or batching == "slide":
        return [np.asarray(g) for g in groups]
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(np.asarray(g), size=max(1, round(len(g) * limit / total)), replace=False)) for g in groups]


def save_reference(path: str | os.PathLike, ref: OODReference | None) -> None:
    """Write ``ref`` to ``path/ood.npz`` (remove a stale file when ``ref`` is None)."""
    target = Path(path) / _FILE
    if ref is None:
        target.unlink(missing_ok=True)
        return
    np.savez(
        target,
        mean=ref.mean,
        precision=ref.precision,
        scalars=np.array([ref.threshold, ref.quantile, ref.shrinkage, ref.n_reference, ref.n_calibration]),
        calibrated_on=np.array(ref.calibrated_on),
    )


def load_reference(path: str | os.PathLike) -> OODReference | None:
    """The reference saved in ``path/ood.npz``, or ``None`` when the directory has none."""
    source = Path(path) / _FILE
    if not source.is_file():
        return None
    with np.load(source, allow_pickle=False) as data:
        threshold, quantile, shrink, n_ref, n_cal = data["scalars"].tolist()
        return OODReference(
            mean=data["mean"],
            precision=data["precision"],
            threshold=threshold,
            quantile=quantile,
            shrinkage=shrink,
            n_reference=int(n_ref),
            n_calibration=int(n_cal),
            calibrated_on=str(data["calibrated_on"]),
        )
