"""Speed and memory of ``stpred.pp.tile`` (tissue detection + tiling) on the five real HER2 sections (C2–C6).

For each section and each tile size (100 µm and 55 µm squares, and 55 µm circles 100 µm apart, Visium-like), times
one ``pp.tile`` call (the image already read; the first call, which imports squidpy, is warmed up on a small
synthetic image) and reports tiles/s (tiles kept on tissue per second) and grid tiles/s (candidate positions
examined per second), and the peak of Python-traced memory during a second, untimed call (``tracemalloc``: numpy
and dask buffers included).

Scaling: section C2 is also tiled upsampled 2× and 4× along each axis (4× and 16× the pixels, µm per pixel halved
and quartered; pixels repeated block by block, lazily, never materialised):

* stored pyramid: the coarser levels exist (as in an OME-Zarr pyramid or the stpred readers), the full-resolution
  level is lazy. Detection reads one coarse level of the same size whatever the factor, so peak memory should stay
  flat;
* derived pyramid (1× and 2×): every level is computed by dask from the full-resolution level, as
  ``Image2DModel.parse(dask_array, scale_factors=...)`` builds it; reading the coarse level then streams the whole
  image through dask, whose in-flight chunks set the peak.

Usage::

    python benchmarks/bench_tiles.py                    # data from ../shared/data/her2st or STPRED_HER2ST
    python benchmarks/bench_tiles.py --path /data/her2st
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import time
import tracemalloc
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

import stpred
from stpred._provenance import versions

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
CONFIGS = {
    "square_100um": {"size_um": 100.0, "layout": "square"},
    "square_55um": {"size_um": 55.0, "layout": "square"},
    "hex_55um_stride_100um": {"size_um": 55.0, "stride_um": 100.0, "layout": "hex"},
}


def _measure(sdata: Any, **kwargs: Any) -> dict[str, Any]:
    """One ``pp.tile`` call (``copy=True``, so ``sdata`` stays as it is): seconds, tiles, peak traced MiB."""
    gc.collect()
    t0 = time.perf_counter()
    out = stpred.pp.tile(sdata, copy=True, **kwargs)
    seconds = time.perf_counter() - t0
    del out
    gc.collect()
    tracemalloc.start()  # a second call for memory: tracing slows allocation, so it is not timed
    out = stpred.pp.tile(sdata, copy=True, **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    table = next(t for t in out.tables.values() if "tiles" in t.uns.get("stpred", {}))
    meta = table.uns["stpred"]["tiles"]
    return {
        "seconds": round(seconds, 3),
        "n_tiles": int(table.n_obs),
        "n_grid": int(meta["n_grid"]),
        "tiles_per_s": round(table.n_obs / seconds, 1),
        "grid_tiles_per_s": round(meta["n_grid"] / seconds, 1),
        "peak_traced_mib": round(peak / 2**20, 1),
        "level": int(meta["level"]),
        "coarsen": int(meta["coarsen"]),
        "level_shape": [int(v) for v in meta["level_shape"]],
        "tissue_area_fraction": round(float(meta["detection"]["area_fraction"]), 4),
    }


def _repeat(arr: Any, factor: int) -> Any:
    """``arr`` (dask, ``(c, y, x)``) upsampled ``factor`` times by pixel repetition, block by block (lazy)."""
    return arr.map_blocks(
        lambda b: b.repeat(factor, axis=1).repeat(factor, axis=2),
        chunks=(arr.chunks[0], tuple(c * factor for c in arr.chunks[1]), tuple(c * factor for c in arr.chunks[2])),
        dtype=arr.dtype,
    )


def _derived_pyramid(rgb: np.ndarray, factor: int, section: str) -> Any:
    """A lazy image of ``rgb`` upsampled ``factor`` times whose coarser levels dask derives from full resolution.

    What :class:`~spatialdata.models.Image2DModel` builds from a dask array with ``scale_factors``. The
    full-resolution level has 1024 × 1024 chunks for every factor (each made from one input block).
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    side = 1024 // factor
    arr = da.from_array(rgb, chunks=(3, side, side))
    if factor > 1:
        arr = _repeat(arr, factor)
    n_levels = int(np.floor(np.log2(min(arr.shape[1:]) / 256)))
    return Image2DModel.parse(
        arr, dims=("c", "y", "x"), scale_factors=[2] * n_levels, transformations={section: Identity()}
    )


def _stored_pyramid(tree: Any, factor: int, section: str) -> Any:
    """The reader's pyramid ``tree`` upsampled ``factor`` (a power of 2) times: a lazy full-resolution level.

    Level ``k`` of the upsampled image equals level ``k - log2(factor)`` of the original (2 × 2 means undo the
    repetition), so those are reused as stored levels, as in an OME-Zarr pyramid; the full-resolution level and
    the levels in between are lazy repetitions that are never computed unless read.
    """
    import dask.array as da
    from spatialdata import get_pyramid_levels
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    if factor == 1:
        return tree
    levels = [lv.data for lv in get_pyramid_levels(tree)]
    shift = int(np.log2(factor))
    top = [
        _repeat(da.asarray(levels[0]).rechunk((3, 1024 // f, 1024 // f)), f)
        for f in (factor >> i for i in range(shift))
    ]
    out = Image2DModel.parse(
        top[0],
        dims=("c", "y", "x"),
        scale_factors=[2] * (len(levels) + shift - 1),
        transformations={section: Identity()},
    )
    stored = top + levels
    for key, data in zip(list(out), stored, strict=True):
        node = out[key]["image"]
        if node.shape != data.shape:
            msg = f"level {key}: {node.shape} != {data.shape}"
            raise RuntimeError(msg)
        out[key]["image"].data = data if isinstance(data, da.Array) else da.from_array(data)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = os.environ.get("STPRED_HER2ST") or str(Path(__file__).resolve().parents[1].parent / "shared/data/her2st")
    parser.add_argument("--path", default=default, help="folder of the HER2 data")
    parser.add_argument("--out", default=str(RESULTS / "tiles_cpu.json"))
    args = parser.parse_args()

    from spatialdata import SpatialData

    load_before = os.getloadavg()
    warm = stpred.datasets.synthetic(n_sections=1, n_genes=4)
    stpred.pp.tile(warm, size_um=100)  # imports squidpy, skimage; not timed

    sections: dict[str, Any] = {}
    for section in SECTIONS:
        t0 = time.perf_counter()
        sdata = stpred.datasets.her2st(args.path, sections=[section])
        read_s = time.perf_counter() - t0
        image = sdata.images[f"{section}_hne"]["scale0"]["image"]
        entry: dict[str, Any] = {
            "image_px": [int(image.sizes["y"]), int(image.sizes["x"])],
            "mpp": float(sdata.tables["table"].uns["stpred"]["mpp"][section]),
            "read_seconds": round(read_s, 2),
        }
        for name, kwargs in CONFIGS.items():
            entry[name] = _measure(sdata, **kwargs)
        sections[section] = entry
        print(section, json.dumps({k: entry[k]["tiles_per_s"] for k in CONFIGS}), flush=True)
        if section != "C2":
            del sdata
        else:
            c2 = sdata
        gc.collect()

    # ---------------------------------------------------------------- peak memory versus image size
    tree = c2.images["C2_hne"]
    mpp = float(c2.tables["table"].uns["stpred"]["mpp"]["C2"])
    stored = {}
    for factor in (1, 2, 4):
        image = _stored_pyramid(tree, factor, "C2")
        full = image["scale0"]["image"]
        res = _measure(SpatialData(images={"C2_hne": image}), size_um=100.0, mpp=mpp / factor)
        res["image_px"] = [int(full.sizes["y"]), int(full.sizes["x"])]
        res["full_resolution_mib"] = round(full.nbytes / 2**20, 1)
        stored[f"{factor}x"] = res
        print("stored", f"{factor}x", json.dumps(res), flush=True)
    rgb = np.asarray(tree["scale0"]["image"].values)
    del c2, tree
    gc.collect()
    derived = {}
    for factor in (1, 2):
        image = _derived_pyramid(rgb, factor, "C2")
        full = image["scale0"]["image"]
        res = _measure(SpatialData(images={"C2_hne": image}), size_um=100.0, mpp=mpp / factor)
        res["image_px"] = [int(full.sizes["y"]), int(full.sizes["x"])]
        res["full_resolution_mib"] = round(full.nbytes / 2**20, 1)
        derived[f"{factor}x"] = res
        print("derived", f"{factor}x", json.dumps(res), flush=True)

    def mean(key: str, field: str) -> float:
        return round(float(np.mean([sections[s][key][field] for s in SECTIONS])), 1)

    result = {
        "benchmark": "pp.tile (squidpy detect_tissue on a coarse level + tiling), HER2 C2-C6",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "device": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "versions": versions() | {p: version(p) for p in ("squidpy", "dask", "scikit-image", "xarray")},
        "sections": sections,
        "summary": {
            name: {
                "mean_tiles_per_s": mean(name, "tiles_per_s"),
                "mean_grid_tiles_per_s": mean(name, "grid_tiles_per_s"),
                "mean_seconds": round(float(np.mean([sections[s][name]["seconds"] for s in SECTIONS])), 3),
                "max_peak_traced_mib": max(sections[s][name]["peak_traced_mib"] for s in SECTIONS),
            }
            for name in CONFIGS
        },
        "scaling_C2_100um_stored_pyramid": stored,
        "scaling_C2_100um_derived_pyramid": derived,
        "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "notes": (
            "Timings exclude reading the JPEG (read_seconds, the reader decodes the whole image). "
            "peak_traced_mib is Python-traced memory (tracemalloc) during the pp.tile call only; "
            "process_peak_rss_mib is dominated by the reader's full-resolution decode."
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
