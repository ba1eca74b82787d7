"""Calibration of stpred's uncertainty on held-out real HER2 sections (CPU budget).

Trains HiFusion on the training sections (default C2, the sample-specific protocol; ``--train C2 C3 C4 C5`` for
the leave-one-section-out variant), as a deep ensemble of ``--n-models`` seeds, then predicts the held-out
sections three ways and scores each with :func:`stpred.metrics.calibration` (per-gene Spearman correlation
between the predicted std and the absolute error, median over genes; coverage of mean ± 1.96·std):

* ``ensemble``: the members' mean and standard deviation;
* ``mc_dropout``: member 0 with its attention dropout active, ``--n-samples`` passes;
* also the out-of-distribution flag rate of member 0 on the held-out sections (calibrated at the validation
  split's 99th percentile, so about 1 % is expected for in-distribution spots).

With ``--tiles-from <saved ensemble>`` it instead tiles the last held-out section over its whole image
(:func:`stpred.pp.tile` with ``min_tissue_fraction=0``, so glass tiles are kept with their tissue fraction),
predicts every tile with member 0 (:func:`stpred.tl.predict` with ``region=``) and adds the OOD flag rate on glass
tiles (tissue fraction 0) and on tissue tiles (>= 0.9) to the existing results file as ``ood_tiles``.

This is a small CPU configuration (narrow trunk, short training, crops resampled to ``--mpp``), not the paper's:
read the numbers as what the method gives at this budget. Results go to
``benchmarks/results/uncertainty_<device>.json``.

Usage::

    python benchmarks/bench_uncertainty.py
    python benchmarks/bench_uncertainty.py --train C2 C3 C4 C5 --n-models 5 --epochs 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", default=["C2"])
    parser.add_argument("--n-models", type=int, default=5)
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="spot crop side in pixels (context: twice this)")
    parser.add_argument("--mpp", type=float, default=1.38, help="µm per crop pixel (112 px x 1.38 = 155 µm)")
    parser.add_argument("--n-top", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", default=os.environ.get("STPRED_HER2ST"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiles-from", default=None, help="saved ensemble: only run the tile OOD measurement")
    parser.add_argument("--tile-um", type=float, default=100.0)
    args = parser.parse_args()
    if args.tiles_from:
        tiles_ood(args)
        return

    import torch

    import stpred

    t0 = time.perf_counter()
    sdata = stpred.datasets.her2st(args.path)
    stpred.pp.select_genes(sdata, n_top=args.n_top, sections=args.train)
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=args.size, context_size=2 * args.size, mpp=args.mpp, progress=False)
    table = sdata.tables["stpred"]
    sections = table.obs["section"].astype(str).to_numpy()
    test = [s for s in dict.fromkeys(sections) if s not in args.train]
    kwargs = {"spot_size": args.size, "context_size": 2 * args.size, "width": args.width}
    seconds = {"prepare": time.perf_counter() - t0}

    t0 = time.perf_counter()
    ensemble = stpred.tl.fit(
        sdata, "hifusion", train=args.train, max_epochs=args.epochs, seed=args.seed, n_models=args.n_models,
        progress=False, **kwargs,
    )  # fmt: skip
    seconds["fit_ensemble"] = time.perf_counter() - t0
    print(f"ensemble saved at {ensemble.info['checkpoint']}", flush=True)
    t0 = time.perf_counter()
    stpred.tl.predict(sdata, ensemble, sections=test, key_added="ens", uncertainty="ensemble", progress=False)
    seconds["predict_ensemble"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    member = ensemble.members[0]
    stpred.tl.predict(
        sdata, member, sections=test, key_added="mc", uncertainty="mc_dropout", n_samples=args.n_samples,
        seed=args.seed, progress=False,
    )  # fmt: skip
    seconds["predict_mc_dropout"] = time.perf_counter() - t0
    stpred.tl.predict(sdata, member, sections=test, key_added="single", ood=True, progress=False)

    target = np.asarray(table.layers["target"], dtype=np.float64)
    results: dict = {}
    for key in ("ens", "mc"):
        per_section = {}
        for section in [*test, "pooled"]:
            rows = np.isin(sections, test) if section == "pooled" else sections == section
            cal = stpred.metrics.calibration(table.layers[key][rows], target[rows], table.layers[f"{key}_std"][rows])
            cal.pop("spearman_per_gene")
            cal["pcc_gene"] = stpred.metrics.pcc_gene(table.layers[key][rows], target[rows])
            per_section[section] = cal
        results["ensemble" if key == "ens" else "mc_dropout"] = per_section
    single = {s: stpred.metrics.pcc_gene(table.layers["single"][sections == s], target[sections == s]) for s in test}
    ood = {
        s: {
            "flag_rate": float(table.obs["single_ood_flag"].to_numpy()[sections == s].mean()),
            "median_score": float(np.median(table.obs["single_ood"].to_numpy()[sections == s])),
        }
        for s in test
    }
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    out = {
        "benchmark": f"uncertainty calibration on real HER2 (train {'+'.join(args.train)}, test {'+'.join(test)})",
        "model": "hifusion",
        "config": {**vars(args), **kwargs},
        "note": "small CPU configuration (narrow trunk, short training, resampled crops); not the paper's",
        "calibration": results,
        "single_member_pcc_gene": single,
        "ood": {"reference": member.ood_reference.summary(), "held_out": ood},
        "ensemble_checkpoint": ensemble.info["checkpoint"],
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "versions": stpred._provenance.versions(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = Path(args.out) if args.out else RESULTS / f"uncertainty_{tag}.json"
    path.write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps({k: out[k] for k in ("calibration", "ood", "seconds")}, indent=2, default=float))
    print(f"wrote {path}")


def tiles_ood(args: argparse.Namespace) -> None:
    """OOD flag rates of member 0 on glass and tissue tiles of the last held-out section (merged into the results)."""
    import torch

    import stpred

    ensemble = stpred.tl.load(args.tiles_from)
    member = ensemble.members[0] if isinstance(ensemble, stpred.tl.EnsemblePredictor) else ensemble
    geometry_source = "predictor"
    if not member.info.get("geometry"):  # saved before tl.fit recorded it: the geometry of this script's crops
        member.info["geometry"] = {
            "spot_size": args.size, "context_size": 2 * args.size, "mpp": args.mpp, "spot_um": args.size * args.mpp,
            "native": False,
        }  # fmt: skip
        geometry_source = "command line (--size, --mpp)"
    sdata = stpred.datasets.her2st(args.path)
    sections = sdata.tables["table"].obs["section"].astype(str).unique().tolist()
    section = [s for s in sections if s not in member.info["train_sections"]][-1]
    t0 = time.perf_counter()
    stpred.pp.tile(sdata, image_key=f"{section}_hne", size_um=args.tile_um, min_tissue_fraction=0.0)
    t_tile = time.perf_counter() - t0
    region = f"{section}_tiles"
    t0 = time.perf_counter()
    stpred.tl.predict(sdata, member, region=region, ood=True, progress=False)
    t_pred = time.perf_counter() - t0
    tiles = sdata.tables[f"{region}_table"]
    key = f"stpred_{member.name}"
    fraction = tiles.obs["tissue_fraction"].to_numpy()
    flag = tiles.obs[f"{key}_ood_flag"].to_numpy()
    score = tiles.obs[f"{key}_ood"].to_numpy()
    out = {
        "section": section,
        "tile_um": args.tile_um,
        "n_tiles": int(len(flag)),
        "glass": {"n": int((fraction == 0).sum()), "flag_rate": float(flag[fraction == 0].mean()),
                  "median_score": float(np.median(score[fraction == 0]))},
        "tissue": {"n": int((fraction >= 0.9).sum()), "flag_rate": float(flag[fraction >= 0.9].mean()),
                   "median_score": float(np.median(score[fraction >= 0.9]))},
        "threshold": member.ood_reference.threshold,
        "geometry": member.info["geometry"],
        "geometry_source": geometry_source,
        "seconds": {"tile": round(t_tile, 1), "predict_tiles": round(t_pred, 1)},
        "load_average": os.getloadavg(),
    }  # fmt: skip
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = Path(args.out) if args.out else RESULTS / f"uncertainty_{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["ood_tiles"] = out
    path.write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps(out, indent=2, default=float))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
