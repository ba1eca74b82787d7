"""Speed and memory of ``stpred.pp.tile`` (tissue detection + tiling) on the five real HER2 sections (C2–C6).

For each section and each tile size (100 µm and 55 µm squares, and 55 µm circles 100 µm apart, Visium-like), times
one ``pp.tile`` call (the image already read; the first call, which imports squidpy, is warmed up on a small
synthetic image) and reports tiles/s (tiles kept on tissue per second) and grid tiles/s (candidate positions
examined per second), and the peak of Python-traced memory during a second, untimed call (``tracemalloc``: numpy
and dask buffers included).

Scaling: section C2 is also tiled as a lazy dask pyramid built from the same pixels at 1× and upsampled 2× along
each axis (4× the pixels, half the µm per pixel, ``dask.array.repeat``: never materialised). Peak traced memory
should not grow with the image size, because detection reads one coarse level only.

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


def _lazy_image(rgb: Any, factor: int, section: str) -> Any:
    """A lazy multiscale image of ``rgb`` (``(c, y, x)``) upsampled ``factor`` times by pixel repetition."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    arr = da.from_array(rgb, chunks=(3, 1024, 1024))
    if factor > 1:
        arr = da.repeat(da.repeat(arr, factor, axis=1), factor, axis=2).rechunk((3, 1024, 1024))
    n_levels = int(np.floor(np.log2(min(arr.shape[1:]) / 256)))
    return Image2DModel.parse(
        arr, dims=("c", "y", "x"), scale_factors=[2] * n_levels, transformations={section: Identity()}
    )


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

    # ---------------------------------------------------------------- peak memory versus image size (lazy pyramid)
    rgb = np.asarray(c2.images["C2_hne"]["scale0"]["image"].values)
    mpp = float(c2.tables["table"].uns["stpred"]["mpp"]["C2"])
    del c2
    gc.collect()
    scaling = {}
    for factor in (1, 2):
        lazy = SpatialData(images={"C2_hne": _lazy_image(rgb, factor, "C2")})
        full = lazy.images["C2_hne"]["scale0"]["image"]
        res = _measure(lazy, size_um=100.0, mpp=mpp / factor)
        res["image_px"] = [int(full.sizes["y"]), int(full.sizes["x"])]
        res["full_resolution_mib"] = round(full.nbytes / 2**20, 1)
        scaling[f"{factor}x"] = res
        print(f"{factor}x", json.dumps(res), flush=True)

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
        "scaling_C2_lazy_100um": scaling,
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
