"""The optional outputs of :func:`stpred.tl.predict`: a standard-deviation layer and out-of-distribution scores."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import STPRED_TABLE

if TYPE_CHECKING:
    from spatialdata import SpatialData

UNCERTAINTY = (None, "mc_dropout", "ensemble")


@dataclass
class Extras:
    """Predictions (table order for the requested rows) with their optional spread and OOD scores."""

    mean: np.ndarray
    std: np.ndarray | None = None
    ood_score: np.ndarray | None = None
    ood_flag: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def check_options(predictor: Any, *, uncertainty: Any, n_samples: Any, ood: Any) -> bool:
    """Check the options against the predictor before any work; return whether OOD scores are computed."""
    from ._ensemble import EnsemblePredictor
    from ._infer import check_mc_dropout

    if uncertainty not in UNCERTAINTY:
        msg = f"Unknown `uncertainty={uncertainty!r}`; expected one of {list(UNCERTAINTY)}."
        raise ValueError(msg)
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 2:
        msg = f"Expected `n_samples` to be an int >= 2 (MC-dropout passes), found {n_samples!r}."
        raise ValueError(msg)
    ensemble = isinstance(predictor, EnsemblePredictor)
    if uncertainty == "ensemble" and not ensemble:
        msg = (
            "`uncertainty='ensemble'` needs several predictors: fit them with `stpred.tl.fit(..., n_models=5)` or "
            "pass a list `model=[p1, p2, ...]`. For a single model with dropout use `uncertainty='mc_dropout'`."
        )
        raise ValueError(msg)
    if uncertainty == "mc_dropout":
        if ensemble:
            msg = "`model` is an ensemble: use `uncertainty='ensemble'` (the spread of its members), not 'mc_dropout'."
            raise ValueError(msg)
        check_mc_dropout(predictor)
    if ood not in (None, True, False):
        msg = f"Expected `ood` to be None (when the predictor has a reference), True or False; found {ood!r}."
        raise ValueError(msg)
    has_reference = predictor.ood_reference is not None
    if ood is True and not has_reference:
        msg = (
            f"The {predictor.name!r} predictor carries no out-of-distribution reference (it is fitted by "
            "`stpred.tl.fit` for models that implement `features`, and saved with the predictor). Refit it with "
            "this stpred version, or pass `ood=False`."
        )
        raise ValueError(msg)
    return has_reference if ood is None else bool(ood)


def predict_extras(
    predictor: Any,
    sdata: SpatialData,
    sections: list[str],
    *,
    uncertainty: str | None,
    n_samples: int,
    ood: bool,
    seed: int = 0,
    table_key: str = STPRED_TABLE,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    prepare_member: Callable[[Any], Any] | None = None,
) -> Extras:
    """Mean (and std, OOD scores as requested) for the rows of ``sections`` in table order.

    ``prepare_member(member) -> Prepared`` replaces the default inputs (the ``stpred`` table's spots), e.g. with
    crops around tiles.
    """
    from ._ensemble import EnsemblePredictor
    from ._infer import _Moments, mc_dropout_moments, prepare, run

    members = predictor.members if isinstance(predictor, EnsemblePredictor) else [predictor]
    features = None
    moments = _Moments()
    mean = std = None
    for i, member in enumerate(members):
        if prepare_member is not None:
            prepared = prepare_member(member)
        else:
            prepared = prepare(member, sdata, sections, table_key=table_key, batch_size=batch_size)
        if uncertainty == "mc_dropout":
            mean, std = mc_dropout_moments(member, prepared, n_samples=n_samples, seed=seed, device=device, progress=progress)
        else:
            moments.add(run(member, prepared, device=device, progress=progress))
        if ood and i == 0:
            features = run(member, prepared, kind="features", device=device, progress=progress)
    if mean is None:
        mean, spread = moments.result()
        std = spread if uncertainty == "ensemble" else None
    extras = Extras(mean=mean, std=std)
    if uncertainty is not None:
        extras.provenance["uncertainty"] = {
            "method": uncertainty,
            "n_samples": n_samples if uncertainty == "mc_dropout" else len(members),
            "seed": seed if uncertainty == "mc_dropout" else None,
            "mean": "mean over the samples" if uncertainty == "mc_dropout" else "mean over the members",
        }
    if ood:
        ref = predictor.ood_reference
        assert features is not None
        extras.ood_score = ref.score(features)
        extras.ood_flag = extras.ood_score > ref.threshold
        extras.provenance["ood"] = {**ref.summary(), "member": 0 if len(members) > 1 else None}
    return extras
