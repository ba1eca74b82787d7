"""Speed and memory of ``stpred.pp.extract_patches`` on the five real HER2 sections (patient C, C2–C6).

Runs ``select_genes(n_top=250)``, then extracts patches at native resolution (224 px spot, 448 px context) and at
``mpp=1.0`` (same sides, resampled), and reports patches/s, seconds per section and peak memory. Two references are
timed in the same run on a few spots and extrapolated to all spots:

* ``bounding_box_query``: one :func:`spatialdata.bounding_box_query` per crop (the obvious SpatialData way),
* ``numpy_loop``: a Python loop of slices on the in-memory image (what the vectorised gather replaces).

Peak memory: resident set size sampled every 5 ms during each call (``psutil``), minus the RSS before the call, and
the process's lifetime peak (``resource.getrusage``). Results go to ``benchmarks/results/patches_cpu.json``.

Usage::

    python benchmarks/bench_patches.py                    # data from stpred.datasets.her2st() or STPRED_HER2ST
    python benchmarks/bench_patches.py --path /data/her2st --baseline-spots 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import stpred
from stpred._provenance import versions
from stpred.pp import _patches
from stpred.pp._patches import get_patch_bank

if TYPE_CHECKING:
    from collections.abc import Callable

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
IMAGES = {"C2": "5714_HE_BT_C2.jpg", "C3": "5714_HE_BT_D1.jpg", "C4": "5714_HE_BT_D2.jpg"}
IMAGES |= {"C5": "5714_HE_BT_E1.jpg", "C6": "5714_HE_BT_E2.jpg"}


class PeakRSS:
    """Context manager sampling the process RSS in a thread; ``.peak_mib`` is the peak above the starting RSS."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_mib = 0.0

    def _run(self) -> None:
        peak = self._start
        while not self._stop.is_set():
            peak = max(peak, self._proc.memory_info().rss)
            time.sleep(self._interval)
        self.peak_mib = (max(peak, self._proc.memory_info().rss) - self._start) / 1024**2

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self._start = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def her2st_root(path: str | None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get("STPRED_HER2ST")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


def load(path: str | None) -> Any:
    """The five sections: ``stpred.datasets.her2st()`` when it exists, else read with ``read_legacy_st`` + ``concat``."""
    if "her2st" in dir(stpred.datasets):
        try:
            return (
                stpred.datasets.her2st(path, sections=list(SECTIONS))
                if path
                else stpred.datasets.her2st(sections=list(SECTIONS))
            )
        except (ImportError, AttributeError, ModuleNotFoundError):
            pass
    root = her2st_root(path)
    parts = [
        stpred.io.read_legacy_st(
            root / "ST-cnts" / f"{s}.tsv.gz",
            root / "ST-spotfiles" / f"{s}_selection.tsv",
            root / "ST-imgs" / "C" / s / IMAGES[s],
            section=s,
            patient="C",
        )
        for s in SECTIONS
    ]
    return stpred.io.concat(parts)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.peak_mib


def bench_extract(sdata: Any, label: str, *, repeats: int, **kw: Any) -> dict[str, Any]:
    """Time each section alone, then all sections in one call, ``repeats`` times each (min and median reported).

    The last full bank stays registered for ``sdata``. Peak memory is that of the first full call.
    """
    table = sdata.tables["stpred"]
    sections = [str(s) for s in table.obs["section"].cat.categories]
    per_section: dict[str, Any] = {}
    for s in sections:
        times, peaks = [], []
        for _ in range(repeats):
            b, sec_s, sec_peak = timed(lambda s=s: stpred.pp.extract_patches(sdata, progress=False, sections=[s], **kw))
            times.append(sec_s)
            peaks.append(sec_peak)
            n_sec = len(b)
            del b
            _patches._REGISTRY.pop(sdata, None)  # the registry would keep every bank alive
        per_section[s] = {
            "n_spots": n_sec,
            "seconds_min": round(min(times), 3),
            "seconds_median": round(float(np.median(times)), 3),
            "peak_rss_above_start_mib": round(peaks[0], 1),
        }
    times = []
    for i in range(repeats):
        _patches._REGISTRY.pop(sdata, None)
        bank, seconds, peak_i = timed(lambda: stpred.pp.extract_patches(sdata, progress=False, **kw))
        times.append(seconds)
        if i == 0:
            peak = peak_i
    n = len(bank)
    best, median = min(times), float(np.median(times))
    n_patches = n * (1 + (bank.context is not None))
    out: dict[str, Any] = {
        "params": dict(kw),
        "n_spots": n,
        "repeats": repeats,
        "seconds_min": round(best, 3),
        "seconds_median": round(median, 3),
        "spots_per_s_best": round(n / best, 1),
        "patches_per_s_best": round(n_patches / best, 1),
        "patches_per_s_median": round(n_patches / median, 1),
        "peak_rss_above_start_mib": round(peak, 1),
        "bank_mib": round((bank.spot.nbytes + (0 if bank.context is None else bank.context.nbytes)) / 1024**2, 1),
        "level_mpp": {k: round(v, 4) for k, v in bank.level_mpp.items()},
        "per_section": per_section,
        "seconds_per_section_median": round(float(np.median([v["seconds_median"] for v in per_section.values()])), 3),
    }
    print(
        f"[{label}] {n} spots ({n_patches} patches): best {best:.2f} s = {n_patches / best:.0f} patches/s, "
        f"median {median:.2f} s; peak +{peak:.0f} MiB",
        flush=True,
    )
    return out


def bench_bbox_query(sdata: Any, section: str, n_spots: int, size: int, context: int) -> dict[str, Any]:
    """One ``bounding_box_query`` + compute per crop on the first ``n_spots`` spots of ``section``."""
    import spatialdata as sd

    table = sdata.tables["stpred"]
    rows = np.flatnonzero((table.obs["section"] == section).to_numpy())[:n_spots]
    xy = table.obsm["spatial"][rows]
    image = sdata.images[f"{section}_hne"]
    t0 = time.perf_counter()
    for x, y in xy:
        for side in (size, context):
            cx, cy = np.floor(x), np.floor(y)
            lo = [cx - side // 2, cy - side // 2]
            crop = sd.bounding_box_query(
                image,
                axes=("x", "y"),
                min_coordinate=lo,
                max_coordinate=[lo[0] + side, lo[1] + side],
                target_coordinate_system=section,
            )
            np.asarray(crop["scale0"]["image"].data.compute())
    seconds = time.perf_counter() - t0
    return {"n_spots_timed": len(rows), "seconds": round(seconds, 3), "seconds_per_spot": round(seconds / len(rows), 4)}


def bench_numpy_loop(sdata: Any, section: str, size: int, context: int) -> dict[str, Any]:
    """Python loop of slices on the in-memory (padded) image: the per-spot alternative to the vectorised gather."""
    table = sdata.tables["stpred"]
    rows = np.flatnonzero((table.obs["section"] == section).to_numpy())
    xy = table.obsm["spatial"][rows]
    t0 = time.perf_counter()
    image = np.asarray(sdata.images[f"{section}_hne"]["scale0"]["image"].data.compute())
    load_s = time.perf_counter() - t0
    pad = context
    t0 = time.perf_counter()
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    pad_s = time.perf_counter() - t0
    spot = np.empty((len(rows), 3, size, size), np.uint8)
    ctx = np.empty((len(rows), 3, context, context), np.uint8)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(xy):
        cx, cy = int(x) + pad, int(y) + pad
        spot[i] = padded[:, cy - size // 2 : cy - size // 2 + size, cx - size // 2 : cx - size // 2 + size]
        ctx[i] = padded[
            :, cy - context // 2 : cy - context // 2 + context, cx - context // 2 : cx - context // 2 + context
        ]
    loop_s = time.perf_counter() - t0
    return {
        "n_spots": len(rows),
        "load_full_image_seconds": round(load_s, 3),
        "pad_seconds": round(pad_s, 3),
        "loop_seconds": round(loop_s, 3),
        "total_seconds": round(load_s + pad_s + loop_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--path", default=None, help="HER2 data folder (default: STPRED_HER2ST or ../shared/data/her2st)"
    )
    parser.add_argument("--baseline-spots", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every extraction")
    parser.add_argument("--out", default=str(RESULTS / "patches_cpu.json"))
    args = parser.parse_args()

    import torch

    result: dict[str, Any] = {
        "benchmark": "stpred.pp.extract_patches on HER2 C2–C6",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": {
            "kind": "cpu",
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "note": "shared machine (2 cores, several users): timings are noisy upper bounds",
        },
        "versions": versions(),
    }
    sdata, load_s, load_peak = timed(lambda: load(args.path))
    table = sdata.tables["table"]
    result["data"] = {
        "sections": {s: int((table.obs["section"] == s).sum()) for s in SECTIONS},
        "n_spots": int(table.n_obs),
        "n_genes": int(table.n_vars),
        "image_shapes": {s: list(sdata.images[f"{s}_hne"]["scale0"]["image"].shape) for s in SECTIONS},
        "mpp": {k: round(float(v), 4) for k, v in table.uns["stpred"]["mpp"].items()},
        "read_seconds": round(load_s, 2),
        "read_peak_rss_above_start_mib": round(load_peak, 1),
    }
    print(f"read {table.n_obs} spots of {len(SECTIONS)} sections in {load_s:.1f} s", flush=True)
    _, sel_s, _ = timed(lambda: stpred.pp.select_genes(sdata, n_top=250))
    _, norm_s, _ = timed(lambda: stpred.pp.normalize(sdata))
    result["select_genes_seconds"] = round(sel_s, 3)
    result["normalize_seconds"] = round(norm_s, 3)

    result["native_224_448"] = bench_extract(sdata, "native", repeats=args.repeats, size=224, context_size=448)
    _patches._REGISTRY.pop(sdata, None)
    result["mpp1_224_448"] = bench_extract(sdata, "mpp=1.0", repeats=args.repeats, size=224, context_size=448, mpp=1.0)

    bank = get_patch_bank(sdata, size=224, context_size=448)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.zarr"
        _, save_s, _ = timed(functools.partial(bank.save, path))
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        _, load_bank_s, _ = timed(lambda: stpred.pp.PatchBank.load(path))
    result["bank_io"] = {
        "bank": "mpp1_224_448",
        "save_seconds": round(save_s, 2),
        "load_seconds": round(load_bank_s, 2),
        "disk_mib": round(disk / 1024**2, 1),
    }
    del bank

    n_total = result["native_224_448"]["n_spots"]
    bbox = bench_bbox_query(sdata, "C2", args.baseline_spots, 224, 448)
    bbox["extrapolated_seconds_all_spots"] = round(bbox["seconds_per_spot"] * n_total, 1)
    bbox["speedup_of_extract_patches"] = round(
        bbox["extrapolated_seconds_all_spots"] / result["native_224_448"]["seconds_min"], 1
    )
    result["baseline_bounding_box_query"] = bbox
    loop = bench_numpy_loop(sdata, "C2", 224, 448)
    loop["extract_patches_seconds_C2"] = result["native_224_448"]["per_section"]["C2"]["seconds_min"]
    result["baseline_numpy_loop_C2"] = loop
    print(
        f"bounding_box_query: {bbox['seconds_per_spot']:.3f} s/spot -> {bbox['extrapolated_seconds_all_spots']:.0f} s "
        f"for {n_total} spots ({bbox['speedup_of_extract_patches']}× slower)",
        flush=True,
    )
    result["process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
