"""Training curves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import doc_params
from ._utils import doc_show_save, finish, new_axes

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from matplotlib.axes import Axes


def history_data(predictor_or_df: Any, *, keys: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Data behind :func:`history`.

    Parameters
    ----------
    predictor_or_df
        As in :func:`history`.
    keys
        Columns to plot; ``None`` picks ``train_loss`` and ``val_loss`` (or every column with ``loss`` in its name).

    Returns
    -------
    frame
        Long-format copy with an integer ``step`` column (the x position: epochs counted across training phases),
        ``epoch``, ``phase`` and ``run`` (the fold when there is a ``fold`` column, else 0), plus the ``keys``.
    keys
        The columns to plot.
    """
    raw = getattr(predictor_or_df, "history", None)
    if raw is None:
        raw = getattr(predictor_or_df, "histories", predictor_or_df)  # a CVResult: one history per fold
    if isinstance(raw, dict):
        raw = pd.DataFrame(raw)
    if isinstance(raw, list | tuple) and raw and all(isinstance(h, pd.DataFrame) for h in raw):
        raw = pd.concat([h if "fold" in h.columns else h.assign(fold=i) for i, h in enumerate(raw)], ignore_index=True)
    if not isinstance(raw, pd.DataFrame):
        msg = (
            "Expected a DataFrame of per-epoch values or an object with a `.history` DataFrame (a `Predictor`), "
            f"found {type(predictor_or_df).__name__}."
        )
        raise TypeError(msg)
    if raw.empty:
        msg = "The history is empty: the model has not been trained (or was loaded without its history)."
        raise ValueError(msg)
    frame = raw.copy()
    if "epoch" not in frame.columns:
        frame = frame.rename_axis("epoch").reset_index() if frame.index.name in (None, "epoch") else frame.reset_index()
        if "epoch" not in frame.columns:
            frame["epoch"] = np.arange(len(frame))
    if keys is None:
        # the MSE of the final prediction: a model's full loss may add auxiliary terms on another scale
        keys = [k for k in ("train_mse", "val_mse") if k in frame.columns] or [
            k for k in ("train_loss", "val_loss") if k in frame.columns
        ]
        if not keys:
            keys = [c for c in frame.columns if "loss" in str(c)]
    else:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in frame.columns]
        if missing:
            msg = f"Column(s) {missing} not in the history; found {list(map(str, frame.columns))}."
            raise KeyError(msg)
    if not keys:
        msg = f"No loss column in the history; found {list(map(str, frame.columns))}. Pass `keys=`."
        raise KeyError(msg)
    if "phase" not in frame.columns:
        frame["phase"] = 1
    frame["run"] = frame["fold"] if "fold" in frame.columns else 0
    frame = frame.sort_values(["run", "phase", "epoch"], kind="stable").reset_index(drop=True)
    # epochs counted across phases: phase 2 continues after the last epoch of phase 1
    frame["step"] = frame.groupby("run").cumcount()
    return frame, keys


def best_epochs(frame: pd.DataFrame, *, monitor: str = "val_loss") -> pd.DataFrame:
    """Row of the smallest ``monitor`` value for each run (and phase) of a :func:`history_data` frame.

    Parameters
    ----------
    frame
        Output of :func:`history_data`.
    monitor
        Column to minimise.

    Returns
    -------
    One row per (run, phase) with ``step``, ``epoch`` and the ``monitor`` value; empty without that column.
    """
    if monitor not in frame.columns or frame[monitor].isna().all():
        return frame.iloc[:0][["run", "phase", "step", "epoch"]]
    valid = frame.dropna(subset=[monitor])
    idx = valid.groupby(["run", "phase"])[monitor].idxmin()
    return frame.loc[idx.to_numpy(), ["run", "phase", "step", "epoch", monitor]].reset_index(drop=True)


@doc_params(show_save=doc_show_save)
def history(
    predictor_or_df: Any,
    *,
    keys: Sequence[str] | None = None,
    monitor: str = "val_mse",
    logy: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Training and validation loss per epoch, with the best epoch marked.

    The best epoch (smallest ``monitor``, the one whose weights :func:`stpred.tl.fit` keeps) gets a dashed line
    and a dot. Histories of several folds (a ``fold`` column, e.g. concatenated ``CVResult.histories``) are drawn
    as thin lines of the same colour; training phases (a ``phase`` column) follow each other on the x axis.

    Parameters
    ----------
    predictor_or_df
        A :class:`stpred.tl.Predictor` (its ``.history``), a :class:`stpred.tl.CVResult` (its ``.histories``, one
        per fold), a list of per-fold histories, or a DataFrame with one row per epoch (an ``epoch`` column or
        index) and columns such as ``train_loss`` and ``val_loss``.
    keys
        Columns to plot (default ``train_mse`` and ``val_mse`` where present, else ``train_loss`` and ``val_loss``).
    monitor
        Column whose minimum marks the best epoch (``val_mse``: what :func:`stpred.tl.fit` selects on; falls back
        to ``val_loss`` when absent).
    logy
        Logarithmic y axis.
    ax
        Axes to draw on; ``None`` creates a figure.
    {show_save}

    Returns
    -------
    The axes, or ``None`` when the figure was shown.
    """
    import matplotlib as mpl

    frame, keys = history_data(predictor_or_df, keys=keys)
    fig, ax = new_axes(ax, figsize=(6.2, 3.4))
    colors = mpl.colormaps["tab10"].colors
    runs = list(dict.fromkeys(frame["run"]))
    many = len(runs) > 1
    phases = list(dict.fromkeys(frame["phase"]))
    for i, key in enumerate(keys):
        labelled = False
        for run in runs:
            for phase in phases:  # one line per phase: no segment joins the end of a phase to the next one
                sub = frame[(frame["run"] == run) & (frame["phase"] == phase)].dropna(subset=[key])
                if sub.empty:
                    continue
                ax.plot(
                    sub["step"],
                    sub[key],
                    color=colors[i % len(colors)],
                    lw=1.0 if many else 1.6,
                    alpha=0.6 if many else 1.0,
                    marker="o" if len(sub) <= 30 and not many else None,
                    ms=3,
                    label=None if labelled else key,
                )
                labelled = True
    if monitor not in frame.columns and "val_loss" in frame.columns:
        monitor = "val_loss"
    best = best_epochs(frame, monitor=monitor)
    for k, row in best.iterrows():
        ax.axvline(row["step"], color="grey", ls="--", lw=0.8, zorder=0)
        label = None
        if k == 0:
            if many or len(phases) > 1:
                label = f"best epoch per {'fold' if many else 'phase'} ({monitor})"
            else:
                label = f"best epoch {int(row['epoch'])} ({monitor} {row[monitor]:.3g})"
        ax.scatter(row["step"], row[monitor], s=40, color="black", zorder=5, label=label)
    # phase boundaries, labelled at the bottom (the legend usually sits at the top)
    first_run = frame[frame["run"] == runs[0]]
    starts = first_run.groupby("phase", sort=False)["step"].min()
    if len(starts) > 1:
        for n, (phase, step) in enumerate(starts.items()):
            if n:
                ax.axvline(step - 0.5, color="black", ls=":", lw=0.8)
            ax.text(step, 0.02, f"phase {phase}", transform=ax.get_xaxis_transform(), va="bottom", fontsize="small")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    title = "training history" + (f" ({len(runs)} folds)" if many else "")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return finish(fig, ax, show=show, save=save)
