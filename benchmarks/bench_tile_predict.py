"""Tiles per second and peak memory of ``tl.predict(region=...)`` for each model, on a real H&E-only section.

Trains small CPU configurations of HiFusion, HiST and MMAP on HER2 section C5 (a few epochs: the point is speed,
not accuracy), tiles section C6 over detected tissue at 100 µm, and times the prediction of every tile (crops cut
from the image around each tile centre at the training geometry; HiST also embeds the tiles' crops). Writes
``benchmarks/results/tile_predict_cpu.json``.

Memory versus image size: C6 is then upsampled 2× and 4× along each axis (4× and 16× the pixels, µm per pixel halved
and quartered; pixels repeated lazily, block by block, never materialised), tiled again at 100 µm (the same tissue,
so about the same tiles) and predicted by every model. Two pyramids, built by ``bench_tiles.py``'s helpers:

* stored: the coarser levels exist (an OME-Zarr pyramid, the stpred readers); crops are cut from the coarsest level
  at least as fine as the training µm per pixel, which is the same stored array at every factor, so the peak
  should stay flat;
* derived (1× and 2×): every level is computed by dask from full resolution (``Image2DModel.parse(dask_array,
  scale_factors=...)``); the bands of the level read are then computed from full-resolution rows.

Each call is measured twice: once timed while a thread samples the resident set size (``/proc/self/statm``, every
millisecond; the growth above the RSS at the start of the call is reported, because ``ru_maxrss`` is set for good by
reading the training images), and once untimed under ``tracemalloc`` (numpy and dask buffers; torch's own allocator
is not traced).

Usage: ``python benchmarks/bench_tile_predict.py [--data PATH] [--out FILE] [--threads N]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from spatialdata import SpatialData

import stpred

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_tiles' pyramid builders


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssPeak:
    """Highest resident set size seen while the ``with`` block runs (sampled by a thread every millisecond)."""

    def __enter__(self) -> _RssPeak:
        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _predict_memory(he: SpatialData, predictor: Any, region: str) -> dict[str, float]:
    """Seconds and RSS growth of one ``tl.predict(region=)`` call, then its traced peak in a second call."""
    gc.collect()
    with _RssPeak() as rss:
        start = time.perf_counter()
        stpred.tl.predict(he, predictor, region=region, progress=False, overwrite=True)
        seconds = time.perf_counter() - start
    gc.collect()
    tracemalloc.start()
    stpred.tl.predict(he, predictor, region=region, progress=False, overwrite=True)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "seconds": round(seconds, 2),
        "rss_growth_mib": round(rss.peak - rss.start, 1),
        "peak_traced_mib": round(traced / 2**20, 1),
    }


def _scaling(tree: Any, mpp: float, predictors: dict[str, Any], *, derived_from: np.ndarray) -> dict[str, Any]:
    """Tile and predict C6 upsampled 1×, 2×, 4× (stored pyramid) and 1×, 2× (derived pyramid)."""
    from bench_tiles import _derived_pyramid, _stored_pyramid

    out: dict[str, Any] = {"stored": {}, "derived": {}}
    for kind, factor in [("stored", 1), ("stored", 2), ("stored", 4), ("derived", 1), ("derived", 2)]:
        image = _stored_pyramid(tree, factor, "C6") if kind == "stored" else _derived_pyramid(derived_from, factor, "C6")
        full = image["scale0"]["image"]
        he = SpatialData(images={"C6_hne": image})
        stpred.pp.tile(he, size_um=100, mpp=mpp / factor, key_added="tiles")
        entry: dict[str, Any] = {
            "image_px": [int(full.sizes["y"]), int(full.sizes["x"])],
            "full_resolution_mib": round(full.nbytes / 2**20, 1),
            "n_tiles": int(he.tables["tiles_table"].n_obs),
        }
        for name, predictor in predictors.items():
            entry[name] = _predict_memory(he, predictor, "tiles")
        out[kind][f"{factor}x"] = entry
        print(kind, f"{factor}x", json.dumps(entry), flush=True)
        del he, image
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("STPRED_HER2ST", ROOT.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results" / "tile_predict_cpu.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    spot_px, context_px, mpp = 56, 112, 2.8
    train = stpred.datasets.her2st(args.data, sections=["C5"])
    stpred.pp.select_genes(train, n_top=64, sections=["C5"])
    stpred.pp.normalize(train)
    stpred.pp.extract_patches(train, size=spot_px, context_size=context_px, mpp=mpp, progress=False)
    stpred.pp.embed(train, encoder="resnet18", width=8, progress=False)
    fits = {
        "hifusion": {"width": 8, "spot_size": spot_px, "context_size": context_px, "grids": (1, 2, 4)},
        "hist": {"width": 16, "heads": 2},
        "mmap": {
            "backbone": "vit",
            "backbone_kwargs": {"img_size": spot_px, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "lora_blocks": 2, "lora_rank": 4, "lora_alpha": 8.0, "attn_heads": 2, "attn_dim_head": 16,
            "proto_k_min": 4, "proto_k_max": 8,
        },
    }  # fmt: skip
    predictors = {name: stpred.tl.fit(train, name, max_epochs=2, progress=False, **kw) for name, kw in fits.items()}

    c6 = stpred.datasets.her2st(args.data, sections=["C6"])
    mpp_c6 = c6.tables["table"].uns["stpred"]["mpp"]["C6"]
    he = SpatialData(images={"C6_hne": c6.images["C6_hne"]})
    start = time.perf_counter()
    stpred.pp.tile(he, size_um=100, mpp=mpp_c6, key_added="C6_tiles")
    tiling_s = time.perf_counter() - start
    n_tiles = he.tables["C6_tiles_table"].n_obs
    image_shape = tuple(int(v) for v in he.images["C6_hne"]["scale0"]["image"].shape)
    results = {}
    for name, predictor in predictors.items():
        with _RssPeak() as rss:
            start = time.perf_counter()
            stpred.tl.predict(he, predictor, region="C6_tiles", progress=False)
            seconds = time.perf_counter() - start
        results[name] = {
            "seconds": round(seconds, 2),
            "tiles_per_s": round(n_tiles / seconds, 1),
            "process_peak_rss_mib_after": round(_peak_mib(), 1),
            "rss_growth_mib": round(rss.peak - rss.start, 1),
        }
        print(name, results[name], flush=True)
    rgb = np.asarray(c6.images["C6_hne"]["scale0"]["image"].values)
    scaling = _scaling(c6.images["C6_hne"], mpp_c6, predictors, derived_from=rgb)
    out = {
        "what": "tl.predict(region=...) on HER2 C6 tiled at 100 µm over detected tissue; CPU configurations",
        "n_tiles": n_tiles,
        "image_shape_cyx": image_shape,
        "tiling_seconds": round(tiling_s, 2),
        "crop_geometry": {"spot_px": spot_px, "context_px": context_px, "mpp": mpp},
        "models": results,
        "memory_vs_image_size_C6_100um": scaling,
        "note": "HiST's time includes embedding every tile crop with the training encoder (ResNet-18, width 8).",
        "threads": args.threads,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "stpred": stpred.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
