"""Deep ensembles: :class:`EnsemblePredictor`, several predictors of one gene panel whose spread is the uncertainty.

Lakshminarayanan, Pritzel & Blundell (2017, "Simple and scalable predictive uncertainty estimation using deep
ensembles", NeurIPS, §2.4): members trained from different random initialisations; their mean is the prediction
and their spread the (epistemic) uncertainty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import STPRED_TABLE
from .._provenance import plain, versions

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._predictor import Predictor

_META = "ensemble.json"


class EnsemblePredictor:
    """Several fitted predictors of the same gene panel and normalisation, applied together.

    Returned by ``stpred.tl.fit(..., n_models=k)`` and :func:`stpred.tl.load` on a saved ensemble; pass it (or a
    list of predictors) as ``model=`` to :func:`stpred.tl.predict`, whose ``uncertainty="ensemble"`` writes the
    members' standard deviation beside their mean.

    Parameters
    ----------
    members
        Two or more :class:`~stpred.tl.Predictor` objects with the same genes (same order) and normalisation.

    Attributes
    ----------
    members
        The predictors.
    name
        The members' model name (``"a+b"`` when they differ).
    genes, normalize
        The shared gene panel and normalisation.
    history
        The members' histories, with a ``member`` column.
    info
        The first member's provenance plus ``"ensemble"``: seeds and checkpoints of every member.

    Examples
    --------
    >>> ensemble = stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"], n_models=5)
    >>> stpred.tl.predict(sdata, ensemble, sections=["S2"], uncertainty="ensemble")
    >>> sdata.tables["stpred"].layers["stpred_hifusion_std"]
    """

    def __init__(self, members: Sequence[Predictor]) -> None:
        from ._predictor import Predictor

        members = list(members)
        bad = [type(m).__name__ for m in members if not isinstance(m, Predictor)]
        if bad:
            msg = f"An ensemble holds Predictor objects (from `stpred.tl.fit` or `stpred.tl.load`); found {bad}."
            raise TypeError(msg)
        if len(members) < 2:
            msg = f"An ensemble needs at least 2 predictors, found {len(members)}; pass `n_models >= 2` or more models."
            raise ValueError(msg)
        first = members[0]
        for i, member in enumerate(members[1:], start=1):
            if member.genes != first.genes:
                missing = [g for g in first.genes if g not in set(member.genes)]
                msg = (
                    f"Ensemble member {i} was trained on a different gene panel than member 0 ({len(member.genes)} vs "
                    f"{len(first.genes)} genes, {len(missing)} of member 0's missing, first: {missing[:3]}). Train "
                    "every member on the same `stpred.pp.select_genes` panel, e.g. with `stpred.tl.fit(..., n_models=k)`."
                )
                raise ValueError(msg)
            if member.normalize.get("method") != first.normalize.get("method"):
                msg = (
                    f"Ensemble member {i} predicts {member.normalize.get('method')!r}-normalised expression, member 0 "
                    f"{first.normalize.get('method')!r}; train every member on the same `stpred.pp.normalize` recipe."
                )
                raise ValueError(msg)
        self.members = members
        names = list(dict.fromkeys(m.name for m in members))
        self.name = "+".join(names)
        self.genes = list(first.genes)
        self.normalize = dict(first.normalize)
        frames = [m.history.assign(member=i) for i, m in enumerate(members) if len(m.history)]
        self.history = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        self.info = dict(first.info)
        self.info["ensemble"] = {
            "n_models": len(members),
            "models": [m.name for m in members],
            "seeds": [m.info.get("seed") for m in members],
            "checkpoints": [m.info.get("checkpoint") for m in members],
        }

    def __repr__(self) -> str:
        return f"EnsemblePredictor(model={self.name!r}, n_models={len(self.members)}, n_genes={len(self.genes)})"

    def __len__(self) -> int:
        return len(self.members)

    @property
    def ood_reference(self) -> Any:
        """The first member's out-of-distribution reference (scores are computed in its feature space)."""
        return self.members[0].ood_reference

    def check_compatible(self, table: Any) -> np.ndarray:
        """Positions of the table's genes in the output (see :meth:`Predictor.check_compatible`)."""
        return self.members[0].check_compatible(table)

    def predict(self, sdata: SpatialData, sections: list[str] | None = None, **kwargs: Any) -> np.ndarray:
        """Mean of the members' :meth:`Predictor.predict` (same arguments)."""
        total = None
        for member in self.members:
            pred = member.predict(sdata, sections, **kwargs).astype(np.float64)
            total = pred if total is None else total + pred
        assert total is not None
        return (total / len(self.members)).astype(np.float32)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write each member to ``path/member_<i>`` and the ensemble's description to ``path/ensemble.json``."""
        path = Path(path)
        if (path / _META).exists() and not overwrite:
            msg = f"{path} already holds a saved ensemble; pass `overwrite=True` to replace it."
            raise FileExistsError(msg)
        path.mkdir(parents=True, exist_ok=True)
        folders = []
        for i, member in enumerate(self.members):
            member.save(path / f"member_{i}", overwrite=overwrite)
            folders.append(f"member_{i}")
        meta = {"kind": "ensemble", "members": folders, "model": self.name, "versions": versions()}
        (path / _META).write_text(json.dumps(plain(meta), indent=2))
        return path


def is_saved_ensemble(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :meth:`EnsemblePredictor.save`."""
    return (Path(path) / _META).is_file()


def load_ensemble(path: str | os.PathLike) -> EnsemblePredictor:
    """Load an ensemble written by :meth:`EnsemblePredictor.save` (each member strictly, as :func:`stpred.tl.load`)."""
    from ._predictor import load

    path = Path(path)
    meta = json.loads((path / _META).read_text())
    ensemble = EnsemblePredictor([load(path / folder) for folder in meta["members"]])
    ensemble.info["checkpoint"] = str(path)
    return ensemble


def as_ensemble(models: Sequence[Any], sdata: SpatialData, *, table_key: str = STPRED_TABLE) -> EnsemblePredictor:
    """An ensemble from a list of predictors, saved paths or fitted model names (each resolved as ``model=``)."""
    from ._predictor import resolve_predictor

    members: list[Predictor] = []
    for model in models:
        resolved = resolve_predictor(sdata, model, table_key=table_key)
        members.extend(resolved.members if isinstance(resolved, EnsemblePredictor) else [resolved])
    return EnsemblePredictor(members)


def check_n_models(n_models: Any) -> int:
    """``n_models`` as a positive int, or a ValueError."""
    import numbers

    if isinstance(n_models, bool) or not isinstance(n_models, numbers.Integral) or n_models < 1:
        msg = f"Expected `n_models` to be a positive int (1: one model; k >= 2: a deep ensemble), found {n_models!r}."
        raise ValueError(msg)
    return int(n_models)


def fit_ensemble(fit_one: Any, *, n_models: int, seed: int, trainer_kwargs: dict[str, Any] | None) -> EnsemblePredictor:
    """Call ``fit_one(seed=..., trainer_kwargs=...)`` for seeds ``seed, seed + 1, ...`` and save the ensemble.

    Each member gets its own checkpoint folder (``<default_root_dir>/member_<i>`` when a root is given).
    """
    import tempfile

    kwargs = dict(trainer_kwargs or {})
    root = kwargs.get("default_root_dir")
    members = []
    for i in range(n_models):
        member_kwargs = dict(kwargs)
        if root is not None:
            member_kwargs["default_root_dir"] = str(Path(root) / f"member_{i}")
        members.append(fit_one(seed=seed + i, trainer_kwargs=member_kwargs))
    ensemble = EnsemblePredictor(members)
    target = Path(root) / "ensemble" if root is not None else Path(tempfile.mkdtemp(prefix="stpred_ensemble_"))
    ensemble.info["checkpoint"] = str(ensemble.save(target, overwrite=True))
    return ensemble
