"""MMAP speed and memory: phase-1/phase-2 spots per second, and per-slide K-means against scikit-learn.

CPU (default when no GPU): ViT-S/16 backbone at 224 px, fp32, small batches.
GPU: the paper's ViT-L/16 (UNI architecture, LayerScale 1e-5, random weights) at 224 px under bf16 autocast.

Usage::

    python benchmarks/bench_mmap.py                 # auto device, writes benchmarks/results/mmap_<device>.json
    python benchmarks/bench_mmap.py --device cpu --steps 2 --batch-size 4

Results are JSON with the device, library versions and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stpred.models._kmeans import kmeans
from stpred.models.mmap import MMAP

if TYPE_CHECKING:
    from collections.abc import Callable

RESULTS = Path(__file__).parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], Any], device: torch.device, *, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _features(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Clustered features resembling ViT tokens: 40 loose groups plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, d, generator=g)
    x = centres[torch.randint(0, 40, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g)
    return x.to(device)


def bench_kmeans(device: torch.device, sizes: list[int], dim: int) -> list[dict]:
    from sklearn.cluster import KMeans

    rows = []
    for n in sizes:
        k = min(max(n // 5, 32), 80)
        x = _features(n, dim, device)
        kmeans(x[: min(n, 500)], 8)  # warm-up
        t_ours, res = _timed(lambda x=x, k=k: kmeans(x, k, seed=42), device, repeats=3)
        xn = x.cpu().numpy()
        t0 = time.perf_counter()
        ref = KMeans(n_clusters=k, random_state=42, n_init=1).fit(xn)
        t_sk = time.perf_counter() - t0
        rows.append(
            {
                "n_spots": n,
                "dim": dim,
                "k": k,
                "torch_s": round(t_ours, 4),
                "sklearn_s": round(t_sk, 4),
                "speedup_vs_sklearn": round(t_sk / t_ours, 2),
                "inertia_ratio_vs_sklearn": round(res.inertia / float(ref.inertia_), 4),
                "torch_iters": res.n_iter,
                "sklearn_iters": int(ref.n_iter_),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _peak(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"peak_rss_mib_process": round(_rss_mib(), 1)}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_model(device: torch.device, *, backbone: str, kwargs: dict, batch_size: int, steps: int, bf16: bool) -> dict:
    n_genes = 250
    torch.manual_seed(0)
    model = MMAP(n_genes, backbone=backbone, backbone_kwargs=kwargs, proto_k_min=32, proto_k_max=80).to(device)
    size = model.backbone.img_size
    spot = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    target = torch.randn(batch_size, n_genes, device=device)
    slide = torch.zeros(batch_size, dtype=torch.long, device=device)
    batch = {"spot": spot, "target": target, "slide": slide}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    n_params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {
        "backbone": backbone,
        "backbone_kwargs": kwargs,
        "img_size": size,
        "batch_size": batch_size,
        "steps": steps,
        "bf16_autocast": bf16,
        "params_total": n_params,
    }

    def train_step() -> None:
        b = model.augment(batch, 0.5)
        with amp:
            loss = model.loss(model(b), b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # phase 1 training
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out["params_trainable_phase1"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_step()  # warm-up
    _reset_peak(device)
    t, _ = _timed(lambda: [train_step() for _ in range(steps)], device, repeats=1)
    out["phase1_train_spots_per_s"] = round(batch_size * steps / t, 2)
    out["phase1_train_memory"] = _peak(device)
    print("phase 1 train", out["phase1_train_spots_per_s"], out["phase1_train_memory"], flush=True)

    # phase 1 inference (encode: what phase 2 caches and runs on every batch)
    model.eval()
    _reset_peak(device)

    def encode() -> dict:
        with amp:
            return model.encode(batch)

    encode()
    t, enc = _timed(lambda: [encode() for _ in range(steps)][-1], device, repeats=1)
    out["encode_spots_per_s"] = round(batch_size * steps / t, 2)
    out["encode_memory"] = _peak(device)
    print("encode", out["encode_spots_per_s"], flush=True)

    # prototypes for one slide, from features of the right width
    feats = _features(400, model.feature_dim, device)
    t, _ = _timed(lambda: model.build_prototypes(feats, torch.zeros(400, dtype=torch.long)), device, repeats=1)
    out["build_prototypes_400_spots_s"] = round(t, 4)

    # phase 2 training, as the engine runs it (backbone recomputed per batch) and with cached features
    model.set_phase(2)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out["params_trainable_phase2"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_step()
    _reset_peak(device)
    t, _ = _timed(lambda: [train_step() for _ in range(steps)], device, repeats=1)
    out["phase2_train_spots_per_s"] = round(batch_size * steps / t, 2)
    out["phase2_train_memory"] = _peak(device)
    batch.update(enc)
    cached_steps = 50
    train_step()
    t, _ = _timed(lambda: [train_step() for _ in range(cached_steps)], device, repeats=1)
    out["phase2_train_cached_spots_per_s"] = round(batch_size * cached_steps / t, 2)
    print(
        "phase 2 train", out["phase2_train_spots_per_s"], "cached", out["phase2_train_cached_spots_per_s"], flush=True
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--kmeans-sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "auto":
        device = torch.device("cpu")
    gpu = device.type == "cuda"
    import sklearn

    import stpred

    result: dict[str, Any] = {
        "benchmark": "mmap",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "stpred": stpred.__version__,
        },
    }
    t0 = time.perf_counter()
    result["kmeans"] = bench_kmeans(device, args.kmeans_sizes, dim=1024 if gpu else 512)
    if not args.skip_model:
        if gpu:
            result["model"] = bench_model(
                device,
                backbone="vit_large_patch16_224",
                kwargs={"init_values": 1e-5},
                batch_size=args.batch_size or 16,
                steps=args.steps or 10,
                bf16=True,
            )
        else:
            result["model"] = bench_model(
                device,
                backbone="vit_small_patch16_224",
                kwargs={},
                batch_size=args.batch_size or 4,
                steps=args.steps or 2,
                bf16=False,
            )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or RESULTS / f"mmap_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
