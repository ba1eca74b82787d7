"""Memory and time of a whole-slide Visium HD section: read → select_genes → normalize → extract_patches.

Writes a synthetic Space Ranger Visium HD folder (8 µm bins only) of ``--bins`` bins × ``--genes`` genes with
sparse counts (about ``--nnz`` non-zero genes per bin, drawn from a heavy-tailed gene-abundance curve so that a few
genes — named ``MT-*`` and ``RPL*``/``RPS*`` here — dominate, as in real data) and a hires image covering the slide
at 1 µm/px, then times, in one process:

1. ``stpred.io.read_visium_hd(path, bin_size=8)`` (spatialdata-io's reader plus the stpred conversion),
2. ``stpred.pp.select_genes(n_top=250)``,
3. ``stpred.pp.normalize()``,
4. ``stpred.pp.extract_patches`` of ``--subset`` random bins (``--size`` px crops of the hires image, no context).

The imports of spatialdata-io and scanpy are timed apart, before step 1. Memory: resident set size sampled every 5 ms during each step (``psutil``), reported as the peak above the RSS
before the step, and the process's lifetime peak (``resource.getrusage``). Results go to
``benchmarks/results/visium_hd_cpu.json`` with the machine load (``os.getloadavg``), the date and the versions.

Usage::

    python benchmarks/bench_visium_hd.py                       # 500,000 bins × 18,000 genes
    python benchmarks/bench_visium_hd.py --bins 20000 --out /tmp/hd_small.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MPP_FULLRES = 0.25  # µm per full-resolution pixel
HIRES_SCALEF = 0.25  # hires pixels per full-resolution pixel: 1 µm per hires pixel
BIN_UM = 8
MARGIN_UM = 40


class PeakRSS:
    """Context manager sampling the process RSS in a thread; ``peak_mib`` is the peak above the starting RSS."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_mib = 0.0
        self.seconds = 0.0

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
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()


def gene_names(n_genes: int) -> list[str]:
    """13 mitochondrial and 80 ribosomal-protein names first (the most abundant), then anonymous genes."""
    mito = [f"MT-G{i}" for i in range(13)]
    ribo = [f"RPL{i}" for i in range(40)] + [f"RPS{i}" for i in range(40)]
    named = mito + ribo
    return named[:n_genes] + [f"GENE{i:05d}" for i in range(max(0, n_genes - len(named)))]


def write_folder(root: Path, *, n_bins: int, n_genes: int, nnz: int, seed: int = 0) -> dict[str, Any]:
    """Write a Visium HD ``outs/`` folder with one bin size (8 µm); return its geometry."""
    import h5py
    import pandas as pd
    from PIL import Image
    from scipy import sparse

    rng = np.random.default_rng(seed)
    n_side = int(np.ceil(np.sqrt(n_bins)))
    rows, cols = np.divmod(np.arange(n_bins), n_side)
    # counts: per-bin number of detected genes ~ Poisson(nnz); genes ~ 1/(rank + 10) abundance
    per_bin = rng.poisson(nnz, n_bins)
    abundance = 1.0 / (np.arange(n_genes) + 10.0)
    genes = rng.choice(n_genes, size=int(per_bin.sum()), p=abundance / abundance.sum()).astype(np.int32)
    bins = np.repeat(np.arange(n_bins, dtype=np.int32), per_bin)
    values = rng.geometric(0.6, size=len(genes)).astype(np.int32)
    counts = sparse.csr_matrix((values, (bins, genes)), shape=(n_bins, n_genes))  # duplicates summed
    del genes, bins, values
    counts.sum_duplicates()
    barcodes = np.array([f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)], dtype="S")
    folder = root / "binned_outputs" / "square_008um"
    (folder / "spatial").mkdir(parents=True)
    (root / "spatial").mkdir(parents=True)
    names = gene_names(n_genes)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        group = f.create_group("matrix")
        group["barcodes"] = barcodes
        # 10x stores genes × barcodes as CSC: the CSR of barcodes × genes, transposed
        group["data"] = counts.data.astype(np.int32)
        group["indices"] = counts.indices.astype(np.int64)
        group["indptr"] = counts.indptr.astype(np.int64)
        group["shape"] = np.array([n_genes, n_bins], dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array([f"ENSG{i:011d}" for i in range(n_genes)], dtype="S")
        features["name"] = np.array(names, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * n_genes, dtype="S")
        features["genome"] = np.array(["GRCh38"] * n_genes, dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])
    nnz_total = int(counts.nnz)
    del counts
    px = BIN_UM / MPP_FULLRES
    margin_px = MARGIN_UM / MPP_FULLRES
    pd.DataFrame(
        {
            "barcode": barcodes.astype(str),
            "in_tissue": np.ones(n_bins, dtype=np.int32),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": margin_px + (rows + 0.5) * px,
            "pxl_col_in_fullres": margin_px + (cols + 0.5) * px,
        }
    ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    scalefactors = {
        "spot_diameter_fullres": px,
        "bin_size_um": float(BIN_UM),
        "microns_per_pixel": MPP_FULLRES,
        "tissue_hires_scalef": HIRES_SCALEF,
        "tissue_lowres_scalef": HIRES_SCALEF / 10,
        "fiducial_diameter_fullres": 4 * px,
        "regist_target_img_scalef": HIRES_SCALEF,
    }
    for where in (folder / "spatial", root / "spatial"):
        (where / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    side_um = n_side * BIN_UM + 2 * MARGIN_UM
    hires_side = int(np.ceil(side_um * HIRES_SCALEF / MPP_FULLRES))
    yy, xx = np.mgrid[0:hires_side, 0:hires_side]
    texture = ((xx // 7 + yy // 5) % 64 * 4).astype(np.uint8)
    image = np.stack([texture, 255 - texture, (texture // 2 + 64).astype(np.uint8)], axis=-1)
    del yy, xx, texture
    Image.fromarray(image).save(root / "spatial" / "tissue_hires_image.png", compress_level=1)
    Image.fromarray(image[::10, ::10]).save(root / "spatial" / "tissue_lowres_image.png")
    return {"n_side": n_side, "nnz": nnz_total, "hires_px": hires_side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=int, default=500_000)
    parser.add_argument("--genes", type=int, default=18_000)
    parser.add_argument("--nnz", type=int, default=100, help="mean number of detected genes per bin")
    parser.add_argument("--subset", type=int, default=10_000, help="bins whose patches are extracted")
    parser.add_argument("--size", type=int, default=112, help="spot-crop side in hires pixels (1 µm/px)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "visium_hd_cpu.json")
    args = parser.parse_args()

    import stpred
    from stpred._provenance import versions

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="stpred_hd_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        geometry = write_folder(tmp / "HD", n_bins=args.bins, n_genes=args.genes, nnz=args.nnz)
        write_s = time.perf_counter() - t0
        print(f"wrote {args.bins} bins, {geometry['nnz']} non-zeros, hires {geometry['hires_px']} px in {write_s:.1f} s")
        t0 = time.perf_counter()
        import spatialdata_io.readers.visium_hd  # noqa: F401  (imports are timed apart from the read)

        import_s = time.perf_counter() - t0
        gc.collect()
        steps: dict[str, dict[str, float]] = {}

        def run(name: str, fn: Any) -> Any:
            with PeakRSS() as probe:
                result = fn()
            steps[name] = {"seconds": round(probe.seconds, 2), "peak_rss_above_start_mib": round(probe.peak_mib, 1)}
            print(f"{name}: {probe.seconds:.1f} s, peak +{probe.peak_mib:.0f} MiB")
            return result

        sdata = run("read_visium_hd", lambda: stpred.io.read_visium_hd(tmp / "HD", bin_size=8))
        raw = sdata.tables["table"]
        run("select_genes", lambda: stpred.pp.select_genes(sdata, n_top=250))
        run("normalize", lambda: stpred.pp.normalize(sdata))
        table = sdata.tables["stpred"]
        rows = np.sort(np.random.default_rng(1).choice(table.n_obs, size=min(args.subset, table.n_obs), replace=False))
        sdata.tables["stpred_subset"] = table[rows].copy()
        bank = run(
            "extract_patches",
            lambda: stpred.pp.extract_patches(
                sdata, table_key="stpred_subset", size=args.size, context_size=None, progress=False
            ),
        )
        ribo_mito = sum(g.startswith(("MT-", "RPL", "RPS")) for g in table.var_names)
        result = {
            "benchmark": "visium_hd_whole_slide",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "loadavg_before": [round(v, 2) for v in load_before],
                "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            },
            "versions": versions(),
            "data": {
                "bins": args.bins,
                "genes": args.genes,
                "nonzeros": geometry["nnz"],
                "density": geometry["nnz"] / (args.bins * args.genes),
                "raw_counts_mib": round((raw.X.data.nbytes + raw.X.indices.nbytes + raw.X.indptr.nbytes) / 1024**2, 1),
                "hires_px": geometry["hires_px"],
                "image_mpp": 1.0,
                "write_folder_seconds": round(write_s, 1),
                "import_spatialdata_io_seconds": round(import_s, 1),
                "n_top": 250,
                "selected_mito_or_ribo": int(ribo_mito),
                "patch_subset": len(rows),
                "patch_size_px": args.size,
                "patch_bank_mib": round(bank.spot.nbytes / 1024**2, 1),
            },
            "steps": steps,
            "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
