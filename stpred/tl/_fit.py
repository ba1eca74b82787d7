"""``tl.fit``: resolve the data, build the model, hand it to the training runner, record what was done."""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import PATIENT_KEY, STPRED_TABLE, TARGET_LAYER, UNS_KEY, BatchKeys
from .._docs import doc_params, doc_sdata_any
from .._provenance import plain, record, stpred_uns, versions
from .._sections import rows_of, section_names
from .._validate import check_sections, get_table
from ..io._anndata import accepts_anndata
from ._ensemble import EnsemblePredictor, check_n_models, fit_ensemble
from ._predictor import Predictor

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..pp._patches import PatchBank

logger = logging.getLogger(__name__)

#: Arguments that ``tl.fit`` no longer takes directly, and where they went.
_MOVED = {
    "accelerator": "trainer_kwargs={'accelerator': ...}",
    "devices": "trainer_kwargs={'devices': ...}",
    "strategy": "trainer_kwargs={'strategy': ...}",
    "precision": "trainer_kwargs={'precision': ...}",
    "checkpoint_dir": "trainer_kwargs={'default_root_dir': ...}",
    "early_stopping_patience": "plan_kwargs={'early_stopping_patience': ...}",
    "val_fraction": "val=<fraction>",
}
#: ``TrainDefaults`` fields set by ``fit``'s own arguments rather than ``plan_kwargs``.
_DIRECT = ("max_epochs", "batch_size", "lr")


@accepts_anndata
@doc_params(sdata=doc_sdata_any)
def fit(
    sdata: SpatialData,
    model: str = "hifusion",
    *,
    preset: str | None = None,
    train: Sequence[str] | None = None,
    val: Sequence[str] | float | Literal[False] | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    embedding_key: str | None = None,
    patches: PatchBank | None = None,
    progress: bool = True,
    table_key: str = STPRED_TABLE,
    group_key: str = PATIENT_KEY,
    plan_kwargs: Mapping[str, Any] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    resume: bool | str | os.PathLike = False,
    n_models: int = 1,
    **model_kwargs: Any,
) -> Predictor | EnsemblePredictor:
    """Train a model on the sections that have measured expression.

    The best epoch is chosen on a validation split that never comes from test sections: held-out training
    patients when the training sections span several patients, otherwise spatial blocks of each training
    section (see ``val``). Training is seeded and, on the CPU, deterministic. Every argument is checked before
    any work starts; a refused call leaves ``sdata`` unchanged.

    Parameters
    ----------
    {sdata}
    model
        Registered model name: ``"hifusion"``, ``"hist"``, ``"mmap"`` or one added with
        :func:`stpred.models.register_model`.
    preset
        A named configuration of the model (``"cpu"``: finishes a HER2 sample-specific fold in minutes on two
        CPU cores; ``"paper"``: the paper's); model options and the arguments below override it. Each preset
        names the crops it reads (``stpred.models.get_preset(model, preset).patches``).
    train
        Training sections (``None``: all). Sections not listed here are never seen in training.
    val
        ``None``: automatic validation split holding out 20 % (held-out patients, or spatial blocks of a single
        patient's sections); a float in (0, 1): the same rule with that fraction; a list of sections; ``False``:
        no validation (the last epoch is kept).
    max_epochs, batch_size, lr
        Override the model's defaults (``model.config.train``): positive ints, and a finite positive float.
    seed
        Seeds weights, batch order, augmentation and the validation split.
    embedding_key
        ``obsm`` key of the patch embeddings, for models that read embeddings (HiST).
    patches
        Patch bank (default: the one registered by :func:`stpred.pp.extract_patches`).
    progress
        Show progress bars.
    table_key
        Name of the ``stpred`` table.
    group_key
        ``obs`` column holding the patient of each section.
    plan_kwargs
        Other optimisation settings, overriding the model's defaults: any field of
        :class:`~stpred.models.TrainDefaults` except the three above (``weight_decay``, ``optimizer``,
        ``scheduler``, ``min_lr``, ``early_stopping_patience``, ``batch_per_section``).
    trainer_kwargs
        Extra keyword arguments for :class:`lightning.pytorch.Trainer`: ``accelerator``, ``devices``,
        ``strategy`` (``"ddp"`` for several GPUs), ``precision`` (default ``"bf16-mixed"`` on CUDA, ``"32-true"``
        on the CPU), ``callbacks`` (added to stpred's), ``default_root_dir`` (the checkpoint folder, see below),
        ...
    resume
        Continue an interrupted fit instead of starting a new one: ``True`` takes the most recent run under the
        checkpoint folder (``trainer_kwargs["default_root_dir"]``) that was started with the same model, settings,
        seed, genes and data; a path names either such a run folder or a checkpoint folder to search. The
        finished phases are restored, the interrupted one continues from its last finished epoch (weights,
        optimiser, schedule, early stopping, RNG); on the CPU the result equals an uninterrupted fit bit for
        bit. A run started with other settings or data is refused, naming what differs.
    n_models
        ``1``: one model. ``k >= 2``: a deep ensemble of ``k`` models trained with seeds ``seed … seed + k - 1``
        (each its own initialisation, batch order and validation split), returned as an
        :class:`~stpred.tl.EnsemblePredictor`; ``stpred.tl.predict(..., uncertainty="ensemble")`` then writes
        their spread. Costs ``k`` fits.
    **model_kwargs
        Model configuration (see the model's config dataclass, e.g. :class:`stpred.models.hifusion.HiFusionConfig`).

    Notes
    -----
    Checkpoints. With ``trainer_kwargs={{"default_root_dir": folder}}`` every fit writes into a new run folder
    ``folder/<model>-<UTC time>-<random id>`` (never into another fit's): the run state, the checkpoints that
    make it resumable (a full ``last.ckpt`` every epoch) and, at the end, the saved predictor
    (``<run folder>/predictor``, recorded as ``checkpoint`` in the provenance, so that ``stpred.tl.predict`` finds
    it again after the SpatialData is written and read back). Without a folder the checkpoints go to a temporary
    folder that is removed when ``fit`` returns or fails; the predictor is then kept in memory only (``predict``
    in the same session, or :meth:`~stpred.tl.Predictor.save`) and the provenance records ``checkpoint`` as
    ``None``.

    Returns
    -------
    The fitted :class:`~stpred.tl.Predictor` (an :class:`~stpred.tl.EnsemblePredictor` when ``n_models > 1``),
    saved to a folder recorded with the fit under ``sdata.tables["stpred"].uns["stpred"]["models"][model]
    ["checkpoint"]`` (the run folder under ``trainer_kwargs["default_root_dir"]``; else, for a zarr-backed object,
    ``<store>.stpred/models/<model>`` next to the store; else a new temporary directory), so that
    ``stpred.tl.predict(sdata, model=model)`` finds it, also after ``sdata.write`` and ``spatialdata.read_zarr``
    in a new process.

    Examples
    --------
    >>> sdata = stpred.datasets.synthetic()
    >>> stpred.pp.select_genes(sdata, n_top=30, sections=["S0", "S1"])
    >>> stpred.pp.normalize(sdata)
    >>> stpred.pp.extract_patches(sdata, size=112, context_size=224)
    >>> predictor = stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"], max_epochs=5,
    ...                           spot_size=112, context_size=224, width=16)
    >>> predictor.history[["epoch", "train_mse", "val_mse"]]

    A fit that can be resumed after an interruption (same call, plus ``resume=True``):

    >>> kwargs = dict(train=["S0", "S1"], max_epochs=5, spot_size=112, context_size=224, width=16)
    >>> stpred.tl.fit(sdata, "hifusion", trainer_kwargs={{"default_root_dir": "runs"}}, **kwargs)
    >>> stpred.tl.fit(sdata, "hifusion", trainer_kwargs={{"default_root_dir": "runs"}}, resume=True, **kwargs)
    """
    n_models = check_n_models(n_models)
    if resume is not False and n_models > 1:
        msg = "`resume=` continues one interrupted fit; resume the members of an ensemble one by one (`n_models=1`)."
        raise ValueError(msg)

    def fit_one(*, seed: int, trainer_kwargs: Mapping[str, Any] | None) -> Predictor:
        return fit_unregistered(
            sdata,
            model,
            preset=preset,
            train=train,
            val=val,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            embedding_key=embedding_key,
            patches=patches,
            progress=progress,
            table_key=table_key,
            group_key=group_key,
            plan_kwargs=plan_kwargs,
            trainer_kwargs=trainer_kwargs,
            resume=resume,
            **model_kwargs,
        )

    if n_models == 1:
        predictor: Predictor | EnsemblePredictor = fit_one(seed=seed, trainer_kwargs=trainer_kwargs)
    else:
        predictor = fit_ensemble(fit_one, n_models=n_models, seed=seed, trainer_kwargs=dict(trainer_kwargs or {}))
    table = get_table(sdata, table_key)
    name, info = predictor.name, predictor.info
    # a single fit with a named folder has already saved itself in its run folder
    saved = info.get("checkpoint") is not None and not isinstance(predictor, EnsemblePredictor)
    backing = getattr(sdata, "path", None)
    if backing is not None and not dict(trainer_kwargs or {}).get("default_root_dir"):
        # a zarr-backed object: keep the predictor next to the store, where a later session looks for it
        info["checkpoint"] = str(Path(f"{backing}.stpred") / "models" / name)
        saved = False
    elif info.get("checkpoint") is None:
        # no folder named and no zarr store: the training checkpoints are already gone; the predictor alone goes to
        # a temporary folder so that `tl.predict(sdata, model=...)` finds it through the recorded path
        info["checkpoint"] = str(Path(tempfile.mkdtemp(prefix="stpred_predictor_")) / name)
    if not saved:
        predictor.save(info["checkpoint"], overwrite=True)
    models = dict(stpred_uns(table).get("models", {}))
    models[name] = plain({**info, "genes": predictor.genes, "normalize": predictor.normalize})
    table.uns[UNS_KEY]["models"] = models
    record(
        table,
        "tl.fit",
        model=name,
        preset=preset,
        seed=seed,
        train=check_sections(train, section_names(table)),
        checkpoint=info["checkpoint"],
        run_dir=info.get("run_dir"),
        resumed=info.get("resumed", False),
        **({"n_models": n_models} if n_models > 1 else {}),
        **model_kwargs,
    )
    return predictor


def fit_unregistered(
    sdata: SpatialData,
    model: str = "hifusion",
    *,
    preset: str | None = None,
    train: Sequence[str] | None = None,
    val: Sequence[str] | float | Literal[False] | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    embedding_key: str | None = None,
    patches: PatchBank | None = None,
    progress: bool = True,
    table_key: str = STPRED_TABLE,
    group_key: str = PATIENT_KEY,
    plan_kwargs: Mapping[str, Any] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    resume: bool | str | os.PathLike = False,
    **model_kwargs: Any,
) -> Predictor:
    """:func:`fit` without recording or registering the result (the per-fold fits of ``cross_validate``).

    Same arguments as :func:`fit`.
    """
    import lightning as L

    from ..models import get_model
    from ..train import TensorStore, TrainRunner
    from ..train._runner import check_trainer_kwargs
    from ._inputs import model_arrays, model_sizes
    from ._ood import reference_from_fit
    from ._region import training_geometry
    from ._splits import targets_of_rows, validation_split

    cls = get_model(model)
    name = cls.name
    table = get_table(sdata, table_key)
    moved = sorted(set(model_kwargs) & set(_MOVED))
    if moved:
        msg = f"`stpred.tl.fit` no longer takes {moved}; pass " + "; ".join(f"{k} as {_MOVED[k]}" for k in moved) + "."
        raise TypeError(msg)
    if preset is not None:
        max_epochs, batch_size, lr, plan_kwargs, model_kwargs = _apply_preset(
            name, preset, max_epochs=max_epochs, batch_size=batch_size, lr=lr, plan_kwargs=plan_kwargs, **model_kwargs
        )
    overrides = _plan_overrides(max_epochs=max_epochs, batch_size=batch_size, lr=lr, plan_kwargs=plan_kwargs)
    trainer_kwargs = dict(trainer_kwargs or {})
    root = trainer_kwargs.pop("default_root_dir", None)
    trainer_kwargs = check_trainer_kwargs(trainer_kwargs)
    root, resume_dir = _check_resume(resume, root, name)
    val, val_fraction = _check_val(val)
    train_sections = check_sections(train, section_names(table))
    normalize = dict(stpred_uns(table).get("normalize", {}))
    if "method" not in normalize:
        msg = "The `stpred` table has no normalised targets. Run `stpred.pp.normalize(sdata)` first."
        raise KeyError(msg)
    _check_targets(table, train_sections)

    L.seed_everything(seed, workers=True, verbose=False)
    sizes = model_sizes(cls, table, embedding_key=embedding_key)
    net = cls.from_sizes(sizes, **model_kwargs)
    plan = replace(net.config.train, **overrides)
    arrays = model_arrays(sdata, table, net, embedding_key=embedding_key, patches=patches, table_key=table_key)
    train_rows, val_rows, val_info = validation_split(
        table, train_sections, val=val, val_fraction=val_fraction, group_key=group_key, seed=seed
    )
    arrays[BatchKeys.TARGET] = targets_of_rows(arrays[BatchKeys.TARGET], [*train_rows.values(), *val_rows.values()])
    genes = list(map(str, table.var_names))
    keep = root is not None or resume_dir is not None
    temporary = None if keep else Path(tempfile.mkdtemp(prefix="stpred_"))
    try:
        store = TensorStore(arrays)
        runner = TrainRunner(
            net,
            store,
            list(train_rows.values()),
            list(val_rows.values()),
            plan=plan,
            # `resume=True`: the run folder is looked up below, once the runner can fingerprint the run
            checkpoint_dir=temporary or resume_dir or (root if resume is not False else _new_run_dir(root, name)),
            seed=seed,
            progress=progress,
            trainer_kwargs=trainer_kwargs,
            resumable=keep,
            fingerprint_extra={"genes": genes, **({"preset": preset} if preset is not None else {})},
        )
        if resume is not False and resume_dir is None:
            from ..train._state import find_run

            runner.checkpoint_dir = find_run(root, runner.fingerprint())
        if resume is not False:
            logger.info("resuming the %r run in %s", name, runner.checkpoint_dir)
        result = runner.run(resume=resume is not False)
        run_dir = None if temporary is not None else runner.checkpoint_dir.absolute()
        info = {
            "seed": seed,
            "preset": preset,
            "train_sections": [s for s in train_sections if s in train_rows],
            "validation": val_info,
            "n_train_spots": int(sum(len(g) for g in runner.train_groups)),
            "n_val_spots": int(sum(len(g) for g in runner.val_groups)),
            "max_epochs": plan.max_epochs,
            "batch_size": plan.batch_size,
            "optim": asdict(plan),
            # checkpoints of a temporary folder are gone when `fit` returns: record none
            "best": {p: {**b, "checkpoint": b["checkpoint"] if run_dir else None} for p, b in result.best.items()},
            "embedding_key": embedding_key if BatchKeys.EMBEDDING in net.inputs else None,
            # the crop recipe, so that a section read on its own is cut the same way at prediction time
            "patches": plain(stpred_uns(table).get("patches")),
            "geometry": training_geometry(
                sdata,
                net,
                patches=patches,
                train_sections=list(train_sections),
                table=table,
                embedding_key=embedding_key,
            ),
            "config": asdict(net.config),
            "precision": str(trainer_kwargs.get("precision", "auto")),
            "run_dir": None if run_dir is None else str(run_dir),
            "resumed": resume is not False,
            "versions": versions(),
        }
        predictor = Predictor(
            net,
            name=name,
            genes=genes,
            normalize=normalize,
            sizes=sizes,
            model_kwargs=model_kwargs,
            history=result.history,
            info=info,
        )
        predictor.ood_reference = reference_from_fit(
            net, store, runner.train_groups, runner.val_groups, seed=seed, batch_size=max(64, plan.batch_size)
        )
        predictor.info["checkpoint"] = None
        if run_dir is not None:
            saved = predictor.save(run_dir / "predictor", overwrite=True)
            predictor.info["checkpoint"] = str(saved)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return predictor


def _check_resume(resume: Any, root: Any, name: str) -> tuple[Path | None, Path | None]:
    """``(checkpoint folder, run folder to resume)`` from ``resume`` and ``default_root_dir``, checked up front."""
    from ..train._state import STATE_FILE, check_has_runs

    if root is not None and not isinstance(root, (str, os.PathLike)):
        msg = f"Expected `trainer_kwargs['default_root_dir']` to be a folder path, found {type(root).__name__}."
        raise TypeError(msg)
    root = None if root is None else Path(root)
    if resume is False:
        return root, None
    if resume is True:
        if root is None:
            msg = (
                "`resume=True` needs the checkpoint folder of the interrupted fit: pass "
                "`trainer_kwargs={'default_root_dir': folder}` as in that fit, or `resume=<run folder>`."
            )
            raise ValueError(msg)
        check_has_runs(root, name)
        return root, None
    if not isinstance(resume, (str, os.PathLike)):
        msg = f"Expected `resume` to be False, True or a folder path, found {type(resume).__name__}."
        raise TypeError(msg)
    path = Path(resume)
    if not path.is_dir():
        msg = f"`resume={str(resume)!r}` is not a folder; pass the run folder (or checkpoint folder) of the fit to resume."
        raise FileNotFoundError(msg)
    run = path if (path / STATE_FILE).is_file() else None
    search = path.parent if run is not None else path
    if root is not None and root.absolute() != search.absolute() and root.absolute() != path.absolute():
        msg = (
            f"`resume={str(resume)!r}` is not under `trainer_kwargs['default_root_dir']={str(root)!r}`; pass one "
            "of the two (the run is continued in its own folder)."
        )
        raise ValueError(msg)
    if run is None:
        check_has_runs(search, name)
    return search, run


def _new_run_dir(root: Path, name: str) -> Path:
    """A new, unique run folder under ``root``: ``<model>-<UTC time>-<random id>`` (created by the runner)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(root) / f"{name}-{stamp}-{uuid.uuid4().hex[:12]}"


def _apply_preset(
    name: str,
    preset: str,
    *,
    max_epochs: Any,
    batch_size: Any,
    lr: Any,
    plan_kwargs: Mapping[str, Any] | None,
    **model_kwargs: Any,
) -> tuple[Any, Any, Any, dict[str, Any], dict[str, Any]]:
    """The fit arguments with the preset's values filled in wherever the caller gave none."""
    from ..models._presets import get_preset

    p = get_preset(name, preset)
    train = dict(p.train)
    direct = {k: train.pop(k) for k in _DIRECT if k in train}
    if plan_kwargs is not None and not isinstance(plan_kwargs, Mapping):
        msg = f"Expected `plan_kwargs` to be a dict, found {type(plan_kwargs).__name__}."
        raise TypeError(msg)
    return (
        max_epochs if max_epochs is not None else direct.get("max_epochs"),
        batch_size if batch_size is not None else direct.get("batch_size"),
        lr if lr is not None else direct.get("lr"),
        {**train, **dict(plan_kwargs or {})},
        {**dict(p.model), **model_kwargs},
    )


def _plan_overrides(
    *, max_epochs: Any, batch_size: Any, lr: Any, plan_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The ``TrainDefaults`` fields to override, each checked (against a probe ``TrainDefaults``) before any work."""
    from ..models import TrainDefaults

    if plan_kwargs is not None and not isinstance(plan_kwargs, Mapping):
        msg = f"Expected `plan_kwargs` to be a dict, found {type(plan_kwargs).__name__}."
        raise TypeError(msg)
    plan_kwargs = dict(plan_kwargs or {})
    allowed = [f.name for f in fields(TrainDefaults) if f.name not in _DIRECT]
    direct = sorted(set(plan_kwargs) & set(_DIRECT))
    if direct:
        msg = f"Pass {direct} to `stpred.tl.fit` directly (e.g. `lr=...`), not in `plan_kwargs`."
        raise TypeError(msg)
    unknown = sorted(set(plan_kwargs) - set(allowed))
    if unknown:
        msg = f"Unknown `plan_kwargs` {unknown}; expected some of {allowed}."
        raise TypeError(msg)
    for key, value in (("max_epochs", max_epochs), ("batch_size", batch_size)):
        if value is not None and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
            msg = f"Expected `{key}` to be a positive int, found {value!r}."
            raise ValueError(msg)
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0
    ):
        msg = f"Expected `lr` to be a finite positive number, found {lr!r}."
        raise ValueError(msg)
    overrides = {k: v for k, v in {"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    overrides.update(plan_kwargs)
    replace(TrainDefaults(), **overrides)  # runs every field check of TrainDefaults before any work
    return overrides


def _check_val(val: Any) -> tuple[Sequence[str] | Literal[False] | None, float]:
    """``val`` as ``(val, val_fraction)`` for the validation split."""
    if isinstance(val, numbers.Real) and not isinstance(val, bool):
        if not 0 < float(val) < 1:
            msg = f"Expected a validation fraction `val` in (0, 1), found {val!r}."
            raise ValueError(msg)
        return None, float(val)
    if val is True:
        msg = "`val=True` is ambiguous: pass `None` (automatic split), a fraction in (0, 1), sections, or `False`."
        raise ValueError(msg)
    return val, 0.2


def _check_targets(table: AnnData, sections: Sequence[str]) -> None:
    """Refuse NaN or infinite targets in the training sections, naming the fix."""
    from ._inputs import target_matrix

    target = target_matrix(table)
    rows = np.concatenate(list(rows_of(table, sections).values()))
    bad = ~np.isfinite(target[rows])
    if bad.any():
        spots = int(bad.any(axis=1).sum())
        msg = (
            f"`layers[{TARGET_LAYER!r}]` has {int(bad.sum())} NaN or infinite values in {spots} spot(s) of the "
            "training sections. Re-run `stpred.pp.normalize(sdata)` on raw counts, or leave those sections out "
            "of `train=`."
        )
        raise ValueError(msg)
