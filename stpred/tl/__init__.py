"""Tools: fit, predict, evaluate, cross-validate, domains."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import attach

_NAMES = {
    "fit": "_fit",
    "predict": "_predict",
    "load": "_predictor",
    "Predictor": "_predictor",
    "PredictorFileError": "_persist",
    "EnsemblePredictor": "_ensemble",
    "evaluate": "_evaluate",
    "cross_validate": "_cv",
    "CVResult": "_cv",
    "domains": "_domains",
    "domain_agreement": "_domains",
    "spatial_autocorr_agreement": "_domains",
}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._cv import CVResult, cross_validate
    from ._domains import domain_agreement, domains, spatial_autocorr_agreement
    from ._ensemble import EnsemblePredictor
    from ._evaluate import evaluate
    from ._fit import fit
    from ._persist import PredictorFileError
    from ._predict import predict
    from ._predictor import Predictor, load
