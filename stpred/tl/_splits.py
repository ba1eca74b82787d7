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
        (``ceil(val_fraction × n_patients)`` of them), otherwise a spatial block of every training section: the
        spots ranked along x (ties broken by y) are cut into ``round(1 / val_fraction)`` strips of equal counts
        and one strip, chosen by ``seed``, is held out. Works for any section of at least 2 spots and any seed. A list of section names: those
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
    n_strips = max(2, round(1 / val_fraction))
    for s in train_sections:
        rows = np.flatnonzero(col == s)
        if len(rows) < 2:
            msg = (
                f"Section {s!r} has {len(rows)} spot(s); a spatial validation block needs at least 2 (one to train "
                "on, one to validate). Pass `val=[...]` sections or `val=False`."
            )
            raise ValueError(msg)
        # strips of equal spot counts along x (ties broken by y): never empty, whatever the grid or the seed
        order = rows[np.lexsort((rows, xy[rows, 1], xy[rows, 0]))]
        strips = [chunk for chunk in np.array_split(order, n_strips) if len(chunk)]
        strip = int(rng.integers(n_strips)) % len(strips)
        in_val = np.isin(rows, strips[strip])
        train[s] = rows[~in_val]
        valr[s] = rows[in_val]
    description = {"rule": "spatial blocks", "fraction": val_fraction, "n_strips": n_strips, "axis": "x"}
    return train, valr, description


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
