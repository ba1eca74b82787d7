"""``tl.predict``: write a fitted model's predictions into ``layers`` of the ``stpred`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import STPRED_TABLE, UNS_KEY, prediction_layer
from .._docs import doc_overwrite, doc_params, doc_sdata
from .._provenance import plain, record, stpred_uns
from .._sections import section_names
from .._validate import check_device, check_sections, get_table
from ._ensemble import EnsemblePredictor, as_ensemble
from ._predictor import Predictor, resolve_predictor
from ._region import predict_region
from ._uncertainty import check_options, predict_extras

if TYPE_CHECKING:
    from spatialdata import SpatialData


@doc_params(sdata=doc_sdata, overwrite=doc_overwrite)
def predict(
    sdata: SpatialData,
    model: str | Predictor | EnsemblePredictor | Sequence[Any] | Any = "hifusion",
    *,
    sections: Sequence[str] | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    table_key: str = STPRED_TABLE,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    uncertainty: Literal["mc_dropout", "ensemble"] | None = None,
    n_samples: int = 20,
    ood: bool | None = None,
    seed: int = 0,
    region: str | None = None,
) -> None:
    """Predict expression for every spot and write it as a layer of the ``stpred`` table.

    Parameters
    ----------
    {sdata}
    model
        A model name fitted on this object with :func:`stpred.tl.fit`, a :class:`~stpred.tl.Predictor`, an
        :class:`~stpred.tl.EnsemblePredictor`, the directory of a saved one, or a list of these (a deep ensemble
        of predictors trained on the same genes; the layer holds their mean).
    sections
        Sections to predict (``None``: all). Rows of other sections are NaN in the new layer.
    key_added
        Layer name (default ``"stpred_<model>"``).
    {overwrite}
    table_key
        Name of the ``stpred`` table.
    batch_size
        Spots per inference batch.
    device
        ``"cuda"``, ``"cuda:<index>"``, ``"cpu"`` or ``"mps"`` (default: CUDA when available). A device this
        torch build cannot use is refused before any work.
    progress
        Show a progress bar.
    uncertainty
        ``None``: no spread. ``"mc_dropout"``: ``n_samples`` passes with the model's dropout layers (and only
        those; BatchNorm stays in eval mode) active; the layer holds the mean over the passes. Refused for a
        model without dropout. ``"ensemble"``: the members of an ensemble (``tl.fit(..., n_models=k)`` or
        ``model=[p1, p2, ...]``); the layer holds their mean. Both write the standard deviation to
        ``layers[key_added + "_std"]``. See :doc:`/uncertainty` for how well it is calibrated.
    n_samples
        MC-dropout passes (``>= 2``).
    ood
        Out-of-distribution scores: the Mahalanobis distance of each spot's image features from the training
        spots' (``obs[key_added + "_ood"]``) and whether it exceeds the validation spots' 99th percentile
        (``obs[key_added + "_ood_flag"]``). ``None``: when the predictor carries a reference (fitted by
        :func:`stpred.tl.fit` for HiFusion, HiST and MMAP); ``True``: required; ``False``: skipped.
    seed
        Seed of the MC-dropout masks (the random state is restored afterwards).
    region
        Key of a shapes element of tiles (from :func:`stpred.pp.tile`): predict every tile instead of the spots
        of the ``stpred`` table. Crops are cut around each tile centre at the microns per pixel the model was
        trained with (HiST: embedded with the training encoder, on a lattice of the tile centres); the tiles' table gets the genes as ``var``, the
        predictions (and ``_std``, ``_ood``) as above, and the provenance in ``uns["stpred"]["predictions"]``.
        ``sections`` and ``table_key`` do not apply. See :doc:`/he_only`.

    Returns
    -------
    Nothing; writes ``sdata.tables["stpred"].layers[key_added]`` (float32, same shape as ``X``, normalised like
    ``layers["target"]``), the optional ``_std`` layer and ``_ood`` / ``_ood_flag`` columns of ``obs`` (NaN /
    ``False`` outside ``sections``), and the provenance under ``uns["stpred"]["predictions"][key_added]``.

    Examples
    --------
    >>> stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"])
    >>> stpred.tl.predict(sdata, "hifusion", sections=["S2"])
    >>> sdata.tables["stpred"].layers["stpred_hifusion"]
    """
    device = check_device(device)
    if region is not None:
        if sections is not None or table_key != STPRED_TABLE:
            msg = "`sections` and `table_key` select spots of the `stpred` table; with `region=` drop them."
            raise ValueError(msg)
        predict_region(
            sdata, _resolve_model(sdata, model, table_key), region, key_added=key_added, overwrite=overwrite,
            uncertainty=uncertainty, n_samples=n_samples, ood=ood, seed=seed, batch_size=batch_size, device=device,
            progress=progress,
        )  # fmt: skip
        return
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    predictor = _resolve_model(sdata, model, table_key)
    with_ood = check_options(predictor, uncertainty=uncertainty, n_samples=n_samples, ood=ood)
    key = key_added or prediction_layer(predictor.name)
    std_key, ood_key, flag_key = f"{key}_std", f"{key}_ood", f"{key}_ood_flag"
    written = [(table.layers, key), *([(table.layers, std_key)] if uncertainty else [])]
    written += [(table.obs, ood_key), (table.obs, flag_key)] if with_ood else []
    taken = [k for where, k in written if k in where]
    if taken and not overwrite:
        msg = f"{taken} already exist; pass `overwrite=True` to replace them or choose another `key_added`."
        raise ValueError(msg)
    if key in ("target", "counts") or std_key in ("target", "counts"):
        msg = f"`key_added={key!r}` would replace the measured data; choose another name."
        raise ValueError(msg)
    all_sections = section_names(table)
    chosen = check_sections(sections, all_sections)
    rows = np.flatnonzero(np.isin(table.obs["section"].astype(str).to_numpy(), chosen))
    extras = None
    if uncertainty is None and not with_ood:
        pred = predictor.predict(
            sdata, chosen, table_key=table_key, batch_size=batch_size, device=device, progress=progress
        )
    else:
        extras = predict_extras(
            predictor, sdata, chosen, uncertainty=uncertainty, n_samples=n_samples, ood=with_ood, seed=seed,
            table_key=table_key, batch_size=batch_size, device=device, progress=progress,
        )  # fmt: skip
        pred = extras.mean
    layer = np.full(table.shape, np.nan, dtype=np.float32)
    layer[rows] = pred
    table.layers[key] = layer
    # an overwritten prediction keeps no spread or OOD columns of the one it replaces
    if uncertainty is None:
        table.layers.pop(std_key, None)
    if not with_ood:
        table.obs.drop(columns=[c for c in (ood_key, flag_key) if c in table.obs], inplace=True)
    if extras is not None and extras.std is not None:
        spread = np.full(table.shape, np.nan, dtype=np.float32)
        spread[rows] = extras.std
        table.layers[std_key] = spread
    if extras is not None and extras.ood_score is not None:
        score = np.full(table.n_obs, np.nan, dtype=np.float32)
        flag = np.zeros(table.n_obs, dtype=bool)
        score[rows], flag[rows] = extras.ood_score, extras.ood_flag
        table.obs[ood_key], table.obs[flag_key] = score, flag
    entry = {
        "model": predictor.name,
        "sections": chosen,
        "genes": predictor.genes,
        "normalize": predictor.normalize,
        "seed": predictor.info.get("seed"),
        "train_sections": predictor.info.get("train_sections"),
        "validation": predictor.info.get("validation"),
        "config": predictor.info.get("config"),
        "checkpoint": predictor.info.get("checkpoint"),
        "versions": predictor.info.get("versions"),
        **({"ensemble": predictor.info["ensemble"]} if "ensemble" in predictor.info else {}),
        **(extras.provenance if extras is not None else {}),
    }
    predictions = dict(stpred_uns(table).get("predictions", {}))
    predictions[key] = plain(entry)
    table.uns[UNS_KEY]["predictions"] = predictions
    record(
        table, "tl.predict", model=predictor.name, key_added=key, sections=chosen,
        **({"uncertainty": uncertainty, "n_samples": n_samples} if uncertainty else {}),
        **({"ood": True} if with_ood else {}),
    )  # fmt: skip


def _resolve_model(sdata: SpatialData, model: Any, table_key: str) -> Any:
    """A Predictor or EnsemblePredictor from what ``model=`` accepts (a list makes an ensemble)."""
    if isinstance(model, list | tuple):
        return as_ensemble(model, sdata, table_key=table_key)
    if isinstance(model, EnsemblePredictor):
        return model
    return resolve_predictor(sdata, model, table_key=table_key)
