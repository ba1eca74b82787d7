"""Model-level speed and memory of HiFusion on random uint8 batches (no data loading).

Measures training throughput (forward + backward + Adam step, spots/s), inference throughput (spots/s) and peak
memory, for HiFusion and for a ResNet-18-only baseline of the same width (the spot crop through one ResNet-18,
pooled, linear head: the plain single-level model), so the ratio shows the cost of the hierarchy and the context
branch.

* CPU: a small configuration (``--cpu-width``, default 16 = a quarter of the paper's widths) at the paper's
  geometry (224 px spot, 448 px context, grids 1/2/7), float32, ``--threads`` threads.
* CUDA (when available): the paper configuration (width 64, 250 genes, batch 32) under
  ``torch.autocast("cuda", dtype=torch.bfloat16)`` with channels_last, optionally ``torch.compile`` (``--compile``).

Results go to ``benchmarks/results/hifusion_<device>.json``.

Usage::

    python benchmarks/bench_hifusion.py                 # CUDA if present, else CPU
    python benchmarks/bench_hifusion.py --device cpu --seconds 20
    python benchmarks/bench_hifusion.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stpred.models._augment import standardize
from stpred.models.encoders.resnet import ResNet
from stpred.models.hifusion import HiFusion

if TYPE_CHECKING:
    from collections.abc import Callable

RESULTS = Path(__file__).resolve().parent / "results"


class ResNet18Baseline(nn.Module):
    """Single-level model: standardised spot crop → ResNet-18 → global average → linear head; MSE loss."""

    inputs = ("spot",)

    def __init__(self, n_genes: int, *, width: int = 64, channels_last: bool = False) -> None:
        super().__init__()
        self.encoder = ResNet((2, 2, 2, 2), width=width)
        self.head = nn.Linear(8 * width, n_genes)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = standardize(batch["spot"])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"pred": self.head(self.encoder(x))}

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss": F.mse_loss(out["pred"].float(), batch["target"].float())}


def _batch(n: int, n_genes: int, spot: int, context: int, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {
        "spot": torch.randint(0, 256, (n, 3, spot, spot), dtype=torch.uint8, generator=g),
        "context": torch.randint(0, 256, (n, 3, context, context), dtype=torch.uint8, generator=g),
        "target": torch.randn(n, n_genes, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(
    step: Callable[[], None], *, device: torch.device, warmup: int, seconds: float, min_steps: int
) -> tuple[int, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < seconds:
        step()
        n += 1
        if device.type == "cuda" and n % 5 == 0:
            _sync(device)
    _sync(device)
    return n, time.perf_counter() - start


def measure(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    device: torch.device,
    autocast: torch.dtype | None,
    compile_model: bool,
    seconds: float,
    warmup: int,
    min_steps: int,
) -> dict[str, Any]:
    """Training and inference throughput and peak memory of ``model`` on ``batch``."""
    model = model.to(device)
    fn = torch.compile(model) if compile_model else model
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    bs = batch["spot"].shape[0]

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            out = fn(batch)
            loss = model.loss(out, batch).loss
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer_step() -> None:
        with amp:
            fn(batch)

    result: dict[str, Any] = {"batch_size": bs, "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    n, t = _timed(train_step, device=device, warmup=warmup, seconds=seconds, min_steps=min_steps)
    result["train_steps"] = n
    result["train_spots_per_s"] = n * bs / t
    if device.type == "cuda":
        result["train_peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        result["process_peak_rss_mib_after_train"] = _rss_mb()
    model.eval()
    n, t = _timed(infer_step, device=device, warmup=warmup, seconds=seconds, min_steps=min_steps)
    result["infer_steps"] = n
    result["infer_spots_per_s"] = n * bs / t
    if device.type == "cuda":
        result["infer_peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["process_peak_rss_mib_after_infer"] = _rss_mb()
    model.to("cpu")
    return result


def _best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the best round (highest throughput), plus every round's throughputs.

    CUDA peak memory is reset per measurement (max over rounds); CPU peak RSS is a process-wide high-water mark,
    so only the first round's value is kept (the baseline runs first, before HiFusion has touched memory).
    """
    out = dict(rounds[0])
    for key in rounds[0]:
        if key.endswith("spots_per_s") or "peak_mem" in key:
            out[key] = max(r[key] for r in rounds)
        if key.endswith("spots_per_s"):
            out[f"{key}_rounds"] = [r[key] for r in rounds]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="timed seconds per measurement (at least --min-steps)"
    )
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="rounds (models alternate); the best round counts")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 32 on CUDA")
    parser.add_argument("--n-genes", type=int, default=250)
    parser.add_argument("--cpu-width", type=int, default=16, help="encoder width on CPU (paper: 64)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        width, bs = 64, args.batch_size or 32
        autocast, channels_last = torch.bfloat16, not args.no_channels_last
        device_name = torch.cuda.get_device_name(device)
        warmup = 5 if args.warmup is None else args.warmup
    else:
        torch.set_num_threads(args.threads)
        width, bs = args.cpu_width, args.batch_size or 8
        autocast, channels_last = None, False
        device_name = _cpu_name()
        warmup = 1 if args.warmup is None else args.warmup

    torch.manual_seed(0)
    config = {"width": width, "channels_last": channels_last}
    batch = _batch(bs, args.n_genes, 224, 448, device)
    common = {
        "device": device,
        "autocast": autocast,
        "compile_model": args.compile,
        "seconds": args.seconds,
        "warmup": warmup,
        "min_steps": args.min_steps,
    }
    models = {
        "resnet18_baseline": ResNet18Baseline(args.n_genes, width=width, channels_last=channels_last),
        "hifusion": HiFusion(args.n_genes, **config),
    }
    # alternate the two models and keep each one's best round: robust to load from other processes
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name].append(measure(model, batch, **common))
    best = {name: _best(rounds) for name, rounds in runs.items()}
    baseline, hifusion = best["resnet18_baseline"], best["hifusion"]

    report = {
        "benchmark": "hifusion_model",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": device_name,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "setup": {
            "n_genes": args.n_genes,
            "spot_size": 224,
            "context_size": 448,
            "grids": [1, 2, 7],
            "width": width,
            "batch_size": bs,
            "autocast": str(autocast) if autocast is not None else "float32",
            "channels_last": channels_last,
            "compile": args.compile,
            "seconds_per_measurement": args.seconds,
            "repeats": args.repeats,
            "aggregation": "best round per model and metric (models alternate between rounds)",
            "memory": "CUDA: torch.cuda.max_memory_allocated per phase; CPU: process peak RSS (ru_maxrss) after "
            "each phase in round 1, cumulative, baseline measured first",
            "train_step": "forward + loss + backward + Adam step",
            "inference": "eval mode, torch.inference_mode",
        },
        "hifusion": hifusion,
        "resnet18_baseline": baseline,
        "ratio_train_hifusion_over_baseline": hifusion["train_spots_per_s"] / baseline["train_spots_per_s"],
        "ratio_infer_hifusion_over_baseline": hifusion["infer_spots_per_s"] / baseline["infer_spots_per_s"],
    }
    tag = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = args.out or RESULTS / f"hifusion_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
