"""The HER2 sample-specific benchmark (train C2, test C3–C6): models at a preset beside the mean and ridge baselines.

Runs :func:`stpred.tl.benchmark` — gene panel chosen on C2 only, validation from scattered spatial blocks of C2,
per-section PCC as the headline with pooled PCC beside it, paired per-gene differences to both baselines with
bootstrap intervals, several seeds — and writes one strict-JSON table (rewritten after every fitted model, so an
interrupted run keeps what finished) to ``benchmarks/results/her2st_protocol_<preset>.json``.

Crops: HiST and the ridge read ResNet-18 embeddings (random initialisation, as HiST's CPU runs here) of 224 px
native crops (~150 µm); HiFusion and MMAP read the crops of their preset (``stpred.models.get_preset``), resampled
so that they cover the same ~150 µm field.

Examples
--------
python benchmarks/her2st_protocol.py --models mean ridge --seeds 0 1 2
python benchmarks/her2st_protocol.py --models mean ridge hist mmap hifusion --preset cpu --seeds 0 1 2
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
EMBEDDING = "X_emb_resnet18"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mean", "ridge", "hist", "mmap", "hifusion"])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-top", type=int, default=250)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--path", default=os.environ.get("STPRED_HER2ST"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    import stpred
    from stpred.models import get_preset

    t0 = time.perf_counter()
    sdata = stpred.datasets.her2st(args.path)
    stpred.pp.select_genes(sdata, n_top=args.n_top, sections=["C2"])
    stpred.pp.normalize(sdata)
    if {"ridge", "hist"} & set(args.models):
        stpred.pp.extract_patches(sdata, size=224, context_size=None, progress=False)
        stpred.pp.embed(sdata, encoder="resnet18")
    crops = {}
    for name in args.models:
        patches = dict(get_preset(name, args.preset).patches)
        if patches and name not in ("hist",):
            crops[(patches["size"], patches.get("context_size"), patches["field_um"])] = name
    for (size, context, field_um), _ in sorted(crops.items(), key=lambda kv: (kv[0][1] is not None, kv[0])):
        stpred.pp.extract_patches(sdata, size=size, context_size=context, mpp=field_um / size, progress=False)
    prep = time.perf_counter() - t0

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"her2st_protocol_{args.preset}_{tag}.json"
    t1 = time.perf_counter()
    result = stpred.tl.benchmark(
        sdata,
        {name: {"preset": args.preset} for name in args.models},
        protocol="sample-specific",
        seeds=tuple(args.seeds),
        embedding_key=EMBEDDING,
        n_boot=args.n_boot,
        path=out,
        progress=False,
    )
    body = json.loads(out.read_text())
    body["environment"] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "versions": stpred._provenance.versions(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": {"prepare": round(prep, 1), "benchmark": round(time.perf_counter() - t1, 1)},
        "presets": {m: get_preset(m, args.preset).description for m in args.models},
        "command": "python benchmarks/her2st_protocol.py " + " ".join(
            ["--models", *args.models, "--preset", args.preset, "--seeds", *map(str, args.seeds)]
        ),
    }
    out.write_text(json.dumps(body, indent=1, allow_nan=False))
    print(result)
    print(result.summary().to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
