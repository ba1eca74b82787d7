"""``tl.fit``: resolve the data, build the model, train it with the engine, record what was done."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import PATIENT_KEY, STPRED_TABLE, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._provenance import plain, record, stpred_uns, versions
from .._validate import check_positive, check_sections, get_table
from ._predictor import Predictor, register_fitted

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..pp._patches import PatchBank

logger = logging.getLogger(__name__)


@doc_params(sdata=doc_sdata)
def fit(
    sdata: SpatialData,
    model: str = "hifusion",
    *,
    train: Sequence[str] | None = None,
    val: Sequence[str] | Literal[False] | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    precision: str | int | None = None,
    seed: int = 0,
    embedding_key: str | None = None,
    patches: PatchBank | None = None,
    val_fraction: float = 0.2,
    early_stopping_patience: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    table_key: str = STPRED_TABLE,
    group_key: str = PATIENT_KEY,
    trainer_kwargs: dict[str, Any] | None = None,
    _register: bool = True,
    **model_kwargs: Any,
) -> Predictor:
    """Train a model on the sections that have measured expression.

    The best epoch is chosen on a validation split that never comes from test sections: held-out training
    patients when the training sections span several patients, otherwise spatial blocks of each training
    section (see ``val``). Training is seeded and, on the CPU, deterministic.

    Parameters
    ----------
    {sdata}
    model
        Registered model name: ``"hifusion"``, ``"hist"`` or ``"mmap"``.
    train
        Training sections (``None``: all). Sections not listed here are never seen in training.
    val
        ``None``: automatic validation split (held-out patients, or spatial blocks of a single patient's
        sections); a list of sections; ``False``: no validation (the last epoch is kept).
    max_epochs, batch_size, lr
        Override the model's defaults (``model.config.train``).
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.pytorch.Trainer` (``strategy="ddp"`` for several GPUs). ``precision=None``
        means ``"bf16-mixed"`` on CUDA and ``"32-true"`` on the CPU.
    seed
        Seeds weights, batch order, augmentation and the validation split.
    embedding_key
        ``obsm`` key of the patch embeddings, for models that read embeddings (HiST).
    patches
        Patch bank (default: the one registered by :func:`stpred.pp.extract_patches`).
    val_fraction
        Fraction of patients or spots held out by the automatic validation rule.
    early_stopping_patience
        Stop after this many epochs without a better validation loss (``None``: train all epochs).
    checkpoint_dir
        Where checkpoints and the saved predictor go (default: a new temporary directory).
    progress
        Show progress bars.
    table_key
        Name of the ``stpred`` table.
    group_key
        ``obs`` column holding the patient of each section.
    trainer_kwargs
        Extra keyword arguments for :class:`lightning.pytorch.Trainer`.
    **model_kwargs
        Model configuration (see the model's config dataclass, e.g. :class:`stpred.models.hifusion.HiFusionConfig`).

    Returns
    -------
    The fitted :class:`~stpred.tl.Predictor`. Also records the fit under
    ``sdata.tables["stpred"].uns["stpred"]["models"][model]`` and remembers the predictor, so that
    ``stpred.tl.predict(sdata, model=model)`` uses it.

    Examples
    --------
    >>> sdata = stpred.datasets.synthetic()
    >>> stpred.pp.select_genes(sdata, n_top=30, sections=["S0", "S1"])
    >>> stpred.pp.normalize(sdata)
    >>> stpred.pp.extract_patches(sdata, size=112, context_size=224)
    >>> predictor = stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"], max_epochs=5,
    ...                           spot_size=112, context_size=224, width=16)
    >>> predictor.history[["epoch", "train_mse", "val_mse"]]
    """
    import lightning as L
    import torch

    from ..models import get_model
    from ..train import TensorStore, train_model
    from ._inputs import model_arrays, model_sizes, section_names
    from ._splits import validation_split

    table = get_table(sdata, table_key, made_by="pp.select_genes")
    cls = get_model(model)
    name = cls.name
    all_sections = section_names(table)
    train_sections = check_sections(train, all_sections)
    for value, label in ((max_epochs, "max_epochs"), (batch_size, "batch_size"), (lr, "lr")):
        if value is not None:
            check_positive(value, name=label)
    if not 0 < val_fraction < 1:
        msg = f"Expected `val_fraction` in (0, 1), found {val_fraction!r}."
        raise ValueError(msg)
    normalize = dict(stpred_uns(table).get("normalize", {}))
    if "method" not in normalize:
        msg = "The `stpred` table has no normalised targets. Run `stpred.pp.normalize(sdata)` first."
        raise KeyError(msg)

    L.seed_everything(seed, workers=True, verbose=False)
    sizes = model_sizes(cls, table, embedding_key=embedding_key)
    net = cls(**sizes, **model_kwargs)
    defaults = net.config.train
    optim = replace(defaults, **{k: v for k, v in {"lr": lr}.items() if v is not None})
    epochs = int(max_epochs or defaults.max_epochs)
    bs = int(batch_size or defaults.batch_size)

    arrays = model_arrays(sdata, table, net, embedding_key=embedding_key, patches=patches)
    train_rows, val_rows, val_info = validation_split(
        table, train_sections, val=val, val_fraction=val_fraction, group_key=group_key, seed=seed
    )
    train_groups = [r for r in train_rows.values() if len(r)]
    val_groups = [r for r in val_rows.values() if len(r)]
    _check_rows(name, train_groups, net.batching)
    store = TensorStore(arrays)
    target_mean = torch.from_numpy(arrays["target"][np.concatenate(train_groups)].mean(axis=0))
    init_bias = getattr(net, "init_head_bias", None)
    if init_bias is not None:
        init_bias(target_mean)

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="stpred_"))
    histories = []
    best = {}
    for phase in tuple(getattr(net, "phases", (1,))):
        set_phase = getattr(net, "set_phase", None)
        if set_phase is not None:
            set_phase(phase)
        prepare = getattr(net, "prepare_slides", None)
        if prepare is not None:
            prepare(store, [*train_groups, *val_groups])
        hist, best_path, best_epoch = train_model(
            net,
            store,
            train_groups,
            val_groups,
            optim=optim,
            batching=net.batching,
            max_epochs=epochs,
            batch_size=bs,
            seed=seed,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            checkpoint_dir=checkpoint_dir,
            early_stopping_patience=early_stopping_patience,
            progress=progress,
            phase=phase,
            trainer_kwargs=trainer_kwargs,
        )
        histories.append(hist)
        best[phase] = {"epoch": best_epoch, "checkpoint": None if best_path is None else str(best_path)}

    import pandas as pd

    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    info = {
        "seed": seed,
        "train_sections": [s for s in train_sections if s in train_rows],
        "validation": val_info,
        "n_train_spots": int(sum(len(g) for g in train_groups)),
        "n_val_spots": int(sum(len(g) for g in val_groups)),
        "max_epochs": epochs,
        "batch_size": bs,
        "optim": asdict(optim),
        "best": best,
        "embedding_key": embedding_key if "embedding" in net.inputs else None,
        "config": asdict(net.config),
        "precision": str(precision) if precision is not None else "auto",
        "versions": versions(),
    }
    predictor = Predictor(
        net,
        name=name,
        genes=list(map(str, table.var_names)),
        normalize=normalize,
        sizes=sizes,
        model_kwargs=model_kwargs,
        history=history,
        info=info,
    )
    saved = predictor.save(checkpoint_dir / "predictor", overwrite=True)
    predictor.info["checkpoint"] = str(saved)
    if _register:
        register_fitted(sdata, predictor)
        models = dict(stpred_uns(table).get("models", {}))
        models[name] = plain({**info, "checkpoint": str(saved), "genes": predictor.genes, "normalize": normalize})
        table.uns[UNS_KEY]["models"] = models
        record(table, "tl.fit", model=name, seed=seed, train=train_sections, checkpoint=str(saved), **model_kwargs)
    return predictor


def _check_rows(name: str, train_groups: list[np.ndarray], batching: str) -> None:
    if not train_groups:
        msg = f"No training spots for {name!r}: every training section went to validation. Pass `val=` explicitly."
        raise ValueError(msg)
    if batching == "slide" and any(len(g) < 2 for g in train_groups):
        msg = f"{name!r} trains on whole slides and needs at least two spots per training section."
        raise ValueError(msg)
