"""Readers for instrument output beyond Visium: legacy-ST array geometry, Visium HD bins, Xenium pseudo-spots."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stpred


# ---------------------------------------------------------------------------------------------------------------------
# legacy ST: square vs checkerboard arrays
# ---------------------------------------------------------------------------------------------------------------------
def _write_st(root: Path, array_xy: np.ndarray, pixel_xy: np.ndarray, *, size: int = 400) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(rng.integers(0, 5, (len(ids), 3)), index=ids, columns=["A", "B", "C"])
    with gzip.open(root / "counts.tsv.gz", "wt") as fh:
        fh.write(counts.to_csv(sep="\t"))
    spots = pd.DataFrame({"x": array_xy[:, 0], "y": array_xy[:, 1], "pixel_x": pixel_xy[:, 0], "pixel_y": pixel_xy[:, 1]})
    spots.to_csv(root / "spots.tsv", sep="\t", index=False)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "he.png")
    return [root / "counts.tsv.gz", root / "spots.tsv", root / "he.png"]


def _lattice(n: int, *, checkerboard: bool, step_px: float) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1))
    array_xy = np.c_[xs.ravel(), ys.ravel()]
    if checkerboard:
        array_xy = array_xy[(array_xy.sum(axis=1) % 2) == 0]
    array_xy = array_xy[1:]  # one spot missing, as under real tissue
    return array_xy, 10.0 + array_xy * step_px


@pytest.mark.parametrize("checkerboard", [False, True])
def test_legacy_st_geometry_is_detected(tmp_path, checkerboard):
    # nearest neighbours 40 px apart in both layouts: 200 µm / 40 px = 5 µm/px
    step = 40.0 / np.sqrt(2) if checkerboard else 40.0
    array_xy, pixel_xy = _lattice(8, checkerboard=checkerboard, step_px=step)
    paths = _write_st(tmp_path, array_xy, pixel_xy)
    sdata = stpred.io.read_legacy_st(*paths, section="T")
    uns = sdata.tables["table"].uns["stpred"]
    assert uns["geometry"] == {"T": "checkerboard" if checkerboard else "square"}
    assert uns["mpp"]["T"] == pytest.approx(5.0)
    np.testing.assert_allclose(sdata.shapes["T_spots"]["radius"], 10.0)  # 100 µm spots: 20 px wide


def test_legacy_st_spot_pitch_override_and_implausible_scale_warning(tmp_path):
    array_xy, pixel_xy = _lattice(6, checkerboard=False, step_px=40.0)
    paths = _write_st(tmp_path, array_xy, pixel_xy)
    sdata = stpred.io.read_legacy_st(*paths, section="T", spot_pitch_um=100)
    uns = sdata.tables["table"].uns["stpred"]
    assert uns["mpp"]["T"] == pytest.approx(2.5)
    assert uns["pitch_um"]["T"] == 100.0
    np.testing.assert_allclose(sdata.shapes["T_spots"]["radius"], 20.0)  # 100 µm spots at 2.5 µm/px
    with pytest.warns(UserWarning, match=r"estimated 20 µm/px .* outside the plausible 0.1–10.0 µm/px .*spot_pitch_um="):
        stpred.io.read_legacy_st(*paths, section="T", spot_pitch_um=800)
    with pytest.raises(ValueError, match="Expected `spot_pitch_um` to be a positive number"):
        stpred.io.read_legacy_st(*paths, section="T", spot_pitch_um=0)
