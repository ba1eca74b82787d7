"""A trained model with everything needed to apply it to new slides: :class:`Predictor`, :func:`load`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import STPRED_TABLE, UNS_KEY
from .._validate import check_sections, get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..models import StpredModel
    from ..pp._patches import PatchBank



class Predictor:
    """A fitted stpred model bound to its gene panel and normalisation.

    Returned by :func:`stpred.tl.fit` and :func:`stpred.tl.load`; pass it as ``model=`` to
    :func:`stpred.tl.predict`.

    Attributes
    ----------
    model
        The trained :class:`~stpred.models.StpredModel` (on the CPU, in eval mode).
    name
        Registered model name (``"hifusion"``, ``"hist"``, ``"mmap"``).
    genes
        Gene panel, in output order.
    normalize
        Normalisation recipe of the targets (``{"method": ...}``).
    history
        Per-epoch training and validation losses.
    info
        Provenance: model kwargs, sizes, seed, splits, best epoch, versions, checkpoint path.

    Examples
    --------
    >>> predictor = stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"])
    >>> values = predictor.predict(sdata, ["S2"])  # (n_spots, n_genes), normalised like layers["target"]
    """

    def __init__(
        self,
        model: StpredModel,
        *,
        name: str,
        genes: list[str],
        normalize: dict[str, Any],
        sizes: dict[str, int],
        model_kwargs: dict[str, Any],
        history: pd.DataFrame | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.genes = list(genes)
        self.normalize = dict(normalize)
        self.sizes = dict(sizes)
        self.model_kwargs = dict(model_kwargs)
        self.history = history if history is not None else pd.DataFrame()
        self.info = dict(info or {})
        #: Out-of-distribution reference (:class:`~stpred.tl._ood.OODReference`), set by ``tl.fit``; saved as ood.npz.
        self.ood_reference: Any = None

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        return (
            f"Predictor(model={self.name!r}, n_genes={len(self.genes)}, normalize={self.normalize.get('method')!r}, "
            f"params={n_params:,}, epochs={len(self.history)})"
        )

    # ------------------------------------------------------------------ apply
    def check_compatible(self, table: Any) -> np.ndarray:
        """Positions of the table's genes in the predictor's output; raise if genes or normalisation differ."""
        uns = table.uns.get(UNS_KEY, {})
        table_genes = list(map(str, table.var_names))
        missing = [g for g in self.genes if g not in set(table_genes)]
        extra = [g for g in table_genes if g not in set(self.genes)]
        if missing or extra:
            msg = (
                f"The predictor was trained on {len(self.genes)} genes; the `stpred` table has {len(table_genes)} "
                f"({len(missing)} of the predictor's genes are missing, first: {missing[:3]}; {len(extra)} are new, "
                f"first: {extra[:3]}). Select the same genes with `stpred.pp.select_genes` or train a new model."
            )
            raise ValueError(msg)
        method = dict(uns.get("normalize", {})).get("method")
        if method != self.normalize.get("method"):
            msg = (
                f"The predictor was trained on {self.normalize.get('method')!r}-normalised targets; the table uses "
                f"{method!r}. Run `stpred.pp.normalize(sdata, method={self.normalize.get('method')!r})`."
            )
            raise ValueError(msg)
        position = {g: i for i, g in enumerate(self.genes)}
        return np.array([position[g] for g in table_genes])

    def predict(
        self,
        sdata: SpatialData,
        sections: list[str] | None = None,
        *,
        table_key: str = STPRED_TABLE,
        patches: PatchBank | None = None,
        embedding_key: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Predict normalised expression for the spots of ``sections``.

        Parameters
        ----------
        sdata
            SpatialData with the ``stpred`` table (and the model's inputs: patches or embeddings).
        sections
            Sections to predict (``None``: all).
        table_key
            Name of the ``stpred`` table.
        patches
            Patch bank to read crops from (default: the one registered by :func:`stpred.pp.extract_patches`).
        embedding_key
            ``obsm`` key of the embeddings (default: the one used in training).
        batch_size
            Spots per inference batch (default: the model's training batch size, at least 64).
        device
            ``"cuda"``, ``"cpu"``; default CUDA when available.
        progress
            Show a progress bar.

        Returns
        -------
        Array ``(n_spots, n_genes)`` for the rows of ``sections`` in table order, genes in table order.
        """
        from .._sections import section_names
        from ..train._trainer import run_inference
        from ._infer import prepare

        table = get_table(sdata, table_key, made_by="pp.select_genes")
        sections = check_sections(sections, section_names(table))
        inputs = prepare(
            self, sdata, sections, table_key=table_key, batch_size=batch_size, patches=patches, embedding_key=embedding_key
        )
        pred = run_inference(
            self.model, inputs.store, inputs.groups, batch_size=inputs.batch_size, device=device, progress=progress
        )
        # `pred` follows the requested section order; return rows in table order, as the docstring promises
        return pred[inputs.unsort][:, inputs.order]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write weights, gene panel, recipe and history to the directory ``path``, atomically.

        The files are written to a temporary sibling directory that is then renamed into place, so an interrupted
        save leaves either the previous predictor or the new one, never a mix. ``manifest.json`` records the model
        config, genes, normalisation and a sha256 of every file; :func:`stpred.tl.load` checks them.

        Parameters
        ----------
        path
            Target directory (created).
        overwrite
            Replace a predictor already saved at ``path``.

        Returns
        -------
        ``path``.

        Examples
        --------
        >>> predictor.save("hifusion_c2")
        >>> stpred.tl.load("hifusion_c2")
        """
        from ._persist import save_predictor

        return save_predictor(self, path, overwrite=overwrite)


def load(path: str | os.PathLike) -> Predictor:
    """Load a predictor written by :meth:`Predictor.save`, checking every file against its manifest.

    Parameters
    ----------
    path
        Directory written by :meth:`Predictor.save`.

    Returns
    -------
    The predictor, with weights loaded strictly (any missing, unexpected or reshaped tensor is an error), and
    its out-of-distribution reference when one was saved (``ood.npz``, checked like the other files). A folder
    written by :meth:`EnsemblePredictor.save <stpred.tl.EnsemblePredictor.save>` loads as an
    :class:`~stpred.tl.EnsemblePredictor`.

    Raises
    ------
    FileNotFoundError
        No saved predictor at ``path``.
    stpred.tl.PredictorFileError
        A file is missing, empty, truncated or fails its checksum; the weights do not fit the model the manifest
        describes; the manifest names an unknown model or was written by a newer stpred. The message names the file.

    Examples
    --------
    >>> predictor.save("hifusion_c2")
    >>> stpred.tl.predict(sdata, stpred.tl.load("hifusion_c2"), key_added="stpred_hifusion_c2")
    """
    from ._ensemble import is_saved_ensemble, load_ensemble
    from ._persist import load_predictor

    if is_saved_ensemble(path):
        return load_ensemble(path)
    return load_predictor(path)


def resolve_predictor(sdata: SpatialData, model: Any, *, table_key: str = STPRED_TABLE) -> Predictor:
    """A predictor from a :class:`Predictor`, a saved directory, or the name of a model fitted on ``sdata``.

    A name is looked up in ``uns["stpred"]["models"][name]["checkpoint"]`` of the table, where :func:`stpred.tl.fit`
    records the folder it saved the predictor to: nothing lives only in this process, so a SpatialData written to
    zarr and read again in a new session finds its models.
    """
    from ..models import get_model

    if isinstance(model, Predictor):
        return model
    if isinstance(model, os.PathLike) or (isinstance(model, str) and os.sep in model):
        return load(model)
    if not isinstance(model, str):
        msg = f"`model` must be a model name, a Predictor or a saved path; found {type(model).__name__}."
        raise TypeError(msg)
    name = model.lower()
    table = sdata.tables.get(table_key) if hasattr(sdata, "tables") else None
    entry = dict(table.uns.get(UNS_KEY, {}).get("models", {})).get(name, {}) if table is not None else {}
    if not entry and Path(model).is_dir():
        return load(model)
    get_model(name)  # unknown names fail here, listing the registered ones
    saved = entry.get("checkpoint")
    if saved and Path(saved).is_dir():
        return load(saved)
    if saved:
        msg = (
            f"The {name!r} model fitted on this object was saved to {saved!r}, which no longer exists. Pass the "
            "predictor's folder as `model=` (wherever it was moved), or re-run `stpred.tl.fit`."
        )
        raise FileNotFoundError(msg)
    msg = (
        f"No fitted {name!r} model for this SpatialData. Run `stpred.tl.fit(sdata, model={name!r})` first, "
        "or pass a Predictor (`model=predictor`) or the path of a saved one."
    )
    raise KeyError(msg)
