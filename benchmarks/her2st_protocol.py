"""Accuracy on the real HER2 sections under the sample-specific protocol (train C2, test C3–C6).

Runs `stpred.tl.cross_validate(..., protocol="sample-specific")` for one model with a CPU-sized budget and writes
every metric (per test section and pooled) beside the training-mean baseline to
``benchmarks/results/her2st_<model>_<device>.json``.

Examples
--------
python benchmarks/her2st_protocol.py hifusion --epochs 30 --width 16
python benchmarks/her2st_protocol.py hist --epochs 100 --encoder resnet18
python benchmarks/her2st_protocol.py mmap --epochs 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["hifusion", "hist", "mmap"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=None, help="HiFusion trunk width / HiST width")
    parser.add_argument("--n-top", type=int, default=250)
    parser.add_argument("--encoder", default="resnet18", help="patch encoder for HiST embeddings")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--size", type=int, default=224, help="spot crop side in pixels")
    parser.add_argument("--mpp", type=float, default=None, help="resample crops to this µm/px (default native)")
    parser.add_argument("--backbone", default=None, help="MMAP ViT backbone (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", default=os.environ.get("STPRED_HER2ST"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    import stpred

    t0 = time.perf_counter()
    sdata = stpred.datasets.her2st(args.path)
    stpred.pp.select_genes(sdata, n_top=args.n_top, sections=["C2"])
    stpred.pp.normalize(sdata)
    kwargs: dict = {}
    if args.model == "hifusion":
        stpred.pp.extract_patches(sdata, size=args.size, context_size=2 * args.size, mpp=args.mpp)
        kwargs.update(spot_size=args.size, context_size=2 * args.size)
        if args.width:
            kwargs["width"] = args.width
    elif args.model == "hist":
        stpred.pp.extract_patches(sdata, size=args.size, context_size=None, mpp=args.mpp)
        stpred.pp.embed(sdata, encoder=args.encoder)
        kwargs["embedding_key"] = f"X_emb_{args.encoder}"
        if args.width:
            kwargs["width"] = args.width
    else:
        stpred.pp.extract_patches(sdata, size=args.size, context_size=None, mpp=args.mpp)
        if args.backbone:
            kwargs["backbone"] = args.backbone
        kwargs["backbone_kwargs"] = {"img_size": args.size}
    prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = stpred.tl.cross_validate(
        sdata,
        args.model,
        protocol="sample-specific",
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=False,
        **kwargs,
    )
    fit_s = time.perf_counter() - t1
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    frame = result.metrics
    pooled = frame[frame["section"] == "pooled"].pivot_table(index="metric", columns="key", values="value")
    out = {
        "benchmark": "her2st sample-specific (train C2, test C3-C6)",
        "model": args.model,
        "config": {
            "epochs": args.epochs, "lr": args.lr, "size": args.size, "mpp": args.mpp, "n_top": args.n_top,
            "seed": args.seed, **kwargs,
        },
        "gene_panel": "top genes by mean count on the training section C2 only",
        "validation": result.folds[0]["validation"],
        "best": result.folds[0]["best"],
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "versions": stpred._provenance.versions(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": {"prepare": round(prep, 1), "cross_validate": round(fit_s, 1)},
        "pooled": {k: {m: float(v) for m, v in pooled[k].items()} for k in pooled.columns},
        "per_section": frame.to_dict(orient="records"),
        "history": result.histories[0].to_dict(orient="records"),
    }
    if args.model == "mmap":
        from stpred import metrics

        out["mmap_paper_metric"] = _mmap_metric(sdata, result.key, metrics)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = Path(args.out) if args.out else RESULTS / f"her2st_{args.model}_{tag}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps({"pooled": out["pooled"], "seconds": out["seconds"]}, indent=2))
    print(f"wrote {path}")


def _mmap_metric(sdata, key, metrics) -> dict:
    """MMAP's headline number (per-gene PCC on test spots pooled across sections) beside the per-section mean."""
    import numpy as np

    table = sdata.tables["stpred"]
    pred = table.layers[key]
    test = ~np.isnan(pred).any(axis=1)
    pooled = metrics.pcc_gene(pred[test], table.layers["target"][test])
    sections = table.obs["section"].astype(str).to_numpy()
    per = [metrics.pcc_gene(pred[test & (sections == s)], table.layers["target"][test & (sections == s)])
           for s in dict.fromkeys(sections[test])]
    return {"pcc_gene_pooled_across_sections": float(pooled), "pcc_gene_mean_of_sections": float(np.nanmean(per))}


if __name__ == "__main__":
    main()
