"""Tiles per second and peak memory of ``tl.predict(region=...)`` for each model, on a real H&E-only section.

Trains small CPU configurations of HiFusion, HiST and MMAP on HER2 section C5 (a few epochs: the point is speed,
not accuracy), tiles section C6 over detected tissue at 100 µm, and times the prediction of every tile (crops cut
from the image around each tile centre at the training geometry; HiST also embeds the tiles' crops). Writes
``benchmarks/results/tile_predict_cpu.json``.

Usage: ``python benchmarks/bench_tile_predict.py [--data PATH] [--out FILE] [--threads N]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("STPRED_HER2ST", ROOT.parent / "shared" / "data" / "her2st"))
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results" / "tile_predict_cpu.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from spatialdata import SpatialData

    import stpred

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
        before = _peak_mib()
        start = time.perf_counter()
        stpred.tl.predict(he, predictor, region="C6_tiles", progress=False)
        seconds = time.perf_counter() - start
        results[name] = {
            "seconds": round(seconds, 2),
            "tiles_per_s": round(n_tiles / seconds, 1),
            "process_peak_rss_mib_after": round(_peak_mib(), 1),
            "peak_rss_growth_mib": round(_peak_mib() - before, 1),
        }
        print(name, results[name], flush=True)
    out = {
        "what": "tl.predict(region=...) on HER2 C6 tiled at 100 µm over detected tissue; CPU configurations",
        "n_tiles": n_tiles,
        "image_shape_cyx": image_shape,
        "tiling_seconds": round(tiling_s, 2),
        "crop_geometry": {"spot_px": spot_px, "context_px": context_px, "mpp": mpp},
        "models": results,
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
