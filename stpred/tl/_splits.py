"""Validation splits that never touch test sections, and the cross-validation protocols."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import PATIENT_KEY, SECTION_KEY, SPATIAL_KEY

if TYPE_CHECKING:
    from anndata import AnnData


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``"S2"`` before ``"S10"``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def sections_by_patient(table: AnnData, group_key: str = PATIENT_KEY) -> dict[str, list[str]]:
    """Sections of each patient, patients and sections in natural order."""
    if group_key not in table.obs:
        msg = f"No column {group_key!r} in `obs` of the `stpred` table; found {list(table.obs.columns)}."
        raise KeyError(msg)
    pairs = table.obs[[SECTION_KEY, group_key]].astype(str).drop_duplicates()
    out: dict[str, list[str]] = {}
    for patient in sorted(pairs[group_key].unique(), key=natural_key):
        secs = pairs.loc[pairs[group_key] == patient, SECTION_KEY].unique()
        out[patient] = sorted(secs, key=natural_key)
    bad = pairs.groupby(SECTION_KEY)[group_key].nunique()
    if (bad > 1).any():
        msg = f"Sections {list(bad[bad > 1].index)} belong to several {group_key!r} values; expected one each."
        raise ValueError(msg)
    return out


def validation_split(
    table: AnnData,
    train_sections: Sequence[str],
    *,
    val: Sequence[str] | Literal[False] | None = None,
    val_fraction: float = 0.2,
    group_key: str = PATIENT_KEY,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Split the training rows into training and validation rows.

    Parameters
    ----------
    table
        The ``stpred`` table.
    train_sections
        Sections available for training (never test sections).
    val
        ``None``: automatic — held-out patients when the training sections span at least two patients
        (``ceil(val_fraction × n_patients)`` of them), otherwise scattered spatial blocks of every training
        section: ``n = round(1 / val_fraction)`` equal-count columns along x, each cut into ``n`` blocks along y,
        and one random block of every column held out (about ``val_fraction`` of the spots, spread over the whole
        section so that the best epoch is not chosen on one atypical strip). A section too small for that holds
        out one of ``n`` equal-count strips along x instead, so any section of at least 2 spots works with any
        seed. A list of section names: those
        sections (they must not be training sections). ``False``: no validation (the last epoch is kept).
    val_fraction
        Fraction of patients or spots held out by the automatic rule.
    group_key
        Column with the patient of each section.
    seed
        Seeds the choice of held-out patients/blocks.

    Returns
    -------
    train_rows, val_rows
        Row indices per section.
    description
        What was done (recorded in ``uns``).
    """
    col = table.obs[SECTION_KEY].astype(str).to_numpy()
    train_sections = list(train_sections)
    rng = np.random.default_rng(seed)
    if val is False:
        train = {s: np.flatnonzero(col == s) for s in train_sections}
        return train, {}, {"rule": "none"}
    if val is not None:
        val = [val] if isinstance(val, str) else list(val)
        overlap = sorted(set(val) & set(train_sections))
        if overlap:
            msg = f"Validation sections {overlap} are also training sections; pass disjoint lists."
            raise ValueError(msg)
        unknown = sorted(set(val) - set(col))
        if unknown:
            msg = f"Unknown validation section(s) {unknown}; the data has {sorted(set(col), key=natural_key)}."
            raise ValueError(msg)
        train = {s: np.flatnonzero(col == s) for s in train_sections}
        valr = {s: np.flatnonzero(col == s) for s in val}
        return train, valr, {"rule": "sections", "sections": val}
    patients = table.obs.loc[np.isin(col, train_sections), group_key].astype(str)
    unique = sorted(patients.unique(), key=natural_key)
    if len(unique) >= 2:
        n_val = max(1, math.ceil(val_fraction * len(unique)))
        n_val = min(n_val, len(unique) - 1)
        held = sorted(rng.choice(unique, size=n_val, replace=False).tolist(), key=natural_key)
        pat = dict(zip(table.obs[SECTION_KEY].astype(str), table.obs[group_key].astype(str)))
        val_secs = [s for s in train_sections if pat[s] in held]
        tr_secs = [s for s in train_sections if pat[s] not in held]
        train = {s: np.flatnonzero(col == s) for s in tr_secs}
        valr = {s: np.flatnonzero(col == s) for s in val_secs}
        return train, valr, {"rule": "held-out patients", "patients": held, "sections": val_secs}
    if SPATIAL_KEY not in table.obsm:
        msg = (
            f"The automatic validation split of a single patient needs spot coordinates in `obsm[{SPATIAL_KEY!r}]` "
            "of the `stpred` table; none found. Pass `val=[...]` sections or `val=False`, or add the coordinates."
        )
        raise KeyError(msg)
    xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    train, valr = {}, {}
    n_blocks = max(2, round(1 / val_fraction))
    for s in train_sections:
        rows = np.flatnonzero(col == s)
        if len(rows) < 2:
            msg = (
                f"Section {s!r} has {len(rows)} spot(s); a spatial validation block needs at least 2 (one to train "
                "on, one to validate). Pass `val=[...]` sections or `val=False`."
            )
            raise ValueError(msg)
        in_val = _scattered_blocks(xy[rows], n_blocks, rng)
        if in_val.all() or not in_val.any():
            # too few spots for n × n blocks: one strip of equal spot counts along x (ties by y), never empty
            order = np.lexsort((np.arange(len(rows)), xy[rows, 1], xy[rows, 0]))
            strips = [chunk for chunk in np.array_split(order, n_blocks) if len(chunk)]
            in_val = np.zeros(len(rows), dtype=bool)
            in_val[strips[int(rng.integers(n_blocks)) % len(strips)]] = True
        train[s] = rows[~in_val]
        valr[s] = rows[in_val]
    layout = (
        f"{n_blocks} equal-count columns along x, each cut into {n_blocks} equal-count blocks along y; one random "
        "block per column is held out"
    )
    return train, valr, {"rule": "spatial blocks", "fraction": val_fraction, "n_blocks": n_blocks, "layout": layout}


def _scattered_blocks(xy: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Validation mask: ``n`` equal-count columns along x, each cut in ``n`` blocks along y, one block per column.

    Holding out one block in every column spreads the validation spots over the whole section (the best epoch is
    chosen on several regions, not on one strip whose tissue may be atypical) while each block stays spatially
    contiguous; about ``1/n`` of the spots are held out.
    """
    m = len(xy)
    order = np.lexsort((xy[:, 1], xy[:, 0]))  # by x, ties by y
    column = np.empty(m, dtype=np.int64)
    column[order] = np.arange(m) * n // max(m, 1)
    in_val = np.zeros(m, dtype=bool)
    for c in range(n):
        members = np.flatnonzero(column == c)
        if not len(members):
            continue
        by_y = members[np.lexsort((xy[members, 0], xy[members, 1]))]
        block = np.arange(len(by_y)) * n // len(by_y)
        in_val[by_y[block == int(rng.integers(n))]] = True
    return in_val


def targets_of_rows(target: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """A copy of ``target`` with NaN in every row outside ``groups`` (the training and validation rows of a fit).

    The training store then holds no target of a test section, so no training step, hook or statistic can read one.
    """
    keep = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]) if len(groups) else np.zeros(0, np.int64)
    out = np.full_like(target, np.nan)
    out[keep] = target[keep]
    return out


def slide_wise_folds(table: AnnData, *, n_folds: int, group_key: str = PATIENT_KEY) -> list[dict[str, Any]]:
    """K folds grouped by patient: patients in natural order, fold ``i`` tests patients ``i, i+k, i+2k, ...``.

    With HER2ST's patients A–H and ``k = 4`` this reproduces HiFusion's grouping {A,E}, {B,F}, {C,G}, {D,H}.
    """
    by_patient = sections_by_patient(table, group_key)
    patients = list(by_patient)
    if n_folds < 2:
        msg = f"Expected `n_folds` ≥ 2, found {n_folds}."
        raise ValueError(msg)
    if len(patients) < n_folds:
        msg = (
            f"The slide-wise protocol needs at least as many patients as folds: found {len(patients)} "
            f"({patients}) for n_folds={n_folds}. Lower `n_folds` or use protocol='sample-specific'."
        )
        raise ValueError(msg)
    folds = []
    for i in range(n_folds):
        test_patients = patients[i::n_folds]
        test = [s for p in test_patients for s in by_patient[p]]
        train = [s for p in patients if p not in test_patients for s in by_patient[p]]
        folds.append({"fold": i, "test_patients": test_patients, "train": train, "test": test})
    return folds


def sample_specific_folds(table: AnnData, *, group_key: str = PATIENT_KEY) -> list[dict[str, Any]]:
    """Per patient: train on the first section (natural order), test on the others."""
    by_patient = sections_by_patient(table, group_key)
    folds = []
    for patient, secs in by_patient.items():
        if len(secs) < 2:
            continue
        folds.append({"fold": len(folds), "test_patients": [patient], "train": secs[:1], "test": secs[1:]})
    if not folds:
        msg = (
            "The sample-specific protocol needs a patient with at least two sections; every patient here has one. "
            "Use protocol='slide-wise'."
        )
        raise ValueError(msg)
    return folds
