"""Speed and memory of HiST per slide (train step and inference) against a dense global-attention transformer.

Synthetic Visium-like slides (hex grid, 100 µm pitch, mapped to the 55 µm lattice with
``stpred.pp._lattice.lattice_indices``) of 1k, 10k and 100k spots with random embeddings. Each (model, size) runs
in its own subprocess so that peak memory is measured in isolation: ``torch.cuda.max_memory_allocated`` on CUDA,
the process's peak resident set size above its baseline (``VmHWM`` after ``clear_refs``) on CPU.

Timings (protocol of reference/hist.md §8): warm-up steps first; then the median (``*_s``) and the minimum
(``*_min_s``, more robust on a shared machine) over ``--repeats`` of

- ``train_s``: forward + backward + AdamW step on the whole slide, lattice tables cached (fixed coordinates);
- ``train_aug_s`` (HiST): the same after ``model.augment`` at full strength (75 % spots dropped, random
  mirror/shear/rotation; fresh tables built every step, as in real training);
- ``infer_s``: forward under ``no_grad`` in eval mode, tables cached;
- ``prepare_s`` (HiST): building the lattice tables of all levels from scratch.

On CPU the workers run with glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised, so that freed
tensors are reused rather than every large allocation being mmap-ed and page-faulted afresh (``--default-malloc``
turns this off; with it, the 100k-spot slide costs ~13x the 10k one instead of ~9x, all in copy/fill ops).

The dense baseline has the same width, depth (6 layers), heads, FFN and head; its attention is
``torch.nn.functional.scaled_dot_product_attention`` over all spots. It is skipped where its time, extrapolated
as N² from the previous size, exceeds ``--dense-max-s``, or where its memory would not fit.

Usage::

    python benchmarks/bench_hist.py                       # CPU defaults: width 64, 2 heads, in_dim 512, 250 genes
    python benchmarks/bench_hist.py --device cuda         # width 512, 8 heads, in_dim 1024, 2000 genes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ worker side


def _hex_slide(n: int) -> np.ndarray:
    """Spot centres (µm) of a roughly square Visium-like hex patch with ``n`` spots (100 µm pitch)."""
    ny = int(np.ceil(np.sqrt(n / (np.sqrt(3) / 2))))
    nx = int(np.ceil(n / ny))
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    i, j = i.ravel(), j.ravel()
    xy = np.c_[i * 100.0 + (j % 2) * 50.0, j * 100.0 * np.sqrt(3) / 2]
    return xy[:n]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class _Peak:
    """Peak memory (MB) of a code block above the memory in use at its start."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kb("VmHWM") * 1024
        self.mb = (peak - self.base) / 2**20
        self.total_mb = peak / 2**20


def _timeit(fn, device, repeats: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    _timeit.last_min = min(times)
    return statistics.median(times)


def _dense_model(in_dim: int, n_genes: int, width: int, heads: int, depth: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))

        def forward(self, x):
            n = x.shape[0]
            q, k, v = self.qkv(self.norm1(x)).view(n, 3, heads, -1).permute(1, 2, 0, 3)  # (H, n, d) each
            a = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
            x = x + self.proj(a.transpose(0, 1).reshape(n, width))
            return x + self.ffn(self.norm2(x))

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(in_dim, width, bias=False)
            self.layers = nn.ModuleList(Layer() for _ in range(depth))
            self.head = nn.Linear(width, n_genes)

        def forward(self, batch):
            x = self.inp(batch["embedding"])
            for layer in self.layers:
                x = layer(x)
            return {"pred": self.head(x)}

        def loss(self, out, batch):
            mse = torch.nn.functional.mse_loss(out["pred"], batch["target"])
            return {"loss": mse}

    return Dense()


def worker(cfg: dict) -> dict:
    import torch

    from stpred.models.hist import HiST
    from stpred.pp._lattice import lattice_indices

    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    n = cfg["n"]
    t = time.perf_counter()
    coords_np = lattice_indices(_hex_slide(n), 55.0)
    lattice_s = time.perf_counter() - t
    batch = {
        "embedding": torch.randn(n, cfg["in_dim"], device=device),
        "coords": torch.from_numpy(coords_np).to(device),
        "target": torch.randn(n, cfg["genes"], device=device),
    }
    depth = 6
    if cfg["model"] == "hist":
        model = HiST(cfg["in_dim"], cfg["genes"], width=cfg["width"], heads=cfg["heads"], aug_schedule="constant")
    else:
        model = _dense_model(cfg["in_dim"], cfg["genes"], cfg["width"], cfg["heads"], depth)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    res = {"model": cfg["model"], "n_spots": n, "params": sum(p.numel() for p in model.parameters())}

    if cfg["model"] == "hist":
        res["lattice_indices_s"] = lattice_s
        res["prepare_s"] = _timeit(lambda: model.prepare(batch["coords"], cache=False), device, cfg["repeats"], 1)
        plan = model.prepare(batch["coords"])
        res["tokens_per_level"] = [lv.n for lv in plan.levels]
        res["mean_neighbours_per_level"] = [
            round(
                float(
                    (
                        lv.regular.pair.sum(-1).flatten()[lv.regular.slot]
                        + lv.shifted.pair.sum(-1).flatten()[lv.shifted.slot]
                    )
                    .float()
                    .mean()
                ),
                2,
            )
            for lv in plan.levels
        ]

    def infer():
        with torch.no_grad():
            model(batch)

    def train(*, aug: bool = False):
        b = model.augment(batch, 0.0) if aug else batch
        loss = model.loss(model(b), b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    with _Peak(device) as pk:
        res["infer_s"] = _timeit(infer, device, cfg["repeats"], cfg["warmup"])
        res["infer_min_s"] = _timeit.last_min
    res["infer_peak_mb"] = round(pk.mb, 1)
    model.train()
    with _Peak(device) as pk:
        res["train_s"] = _timeit(train, device, cfg["repeats"], cfg["warmup"])
        res["train_min_s"] = _timeit.last_min
    res["train_peak_mb"] = round(pk.mb, 1)
    res["train_total_mb"] = round(pk.total_mb, 1)
    if cfg["model"] == "hist":
        res["train_aug_s"] = _timeit(lambda: train(aug=True), device, cfg["repeats"], 1)
        res["train_aug_min_s"] = _timeit.last_min
    return res


# ------------------------------------------------------------------------------------------------ driver side


def _run_worker(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    if cfg["device"] == "cpu" and cfg.get("malloc_reuse"):
        # let glibc reuse freed blocks instead of mmap-ing (and page-faulting) fresh memory for every large tensor:
        # the CPU analogue of the CUDA caching allocator; without it, time grows faster than N on big slides
        env.update(MALLOC_MMAP_THRESHOLD_=str(2**34), MALLOC_TRIM_THRESHOLD_=str(2**34))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"model": cfg["model"], "n_spots": cfg["n"], "skipped": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"model": cfg["model"], "n_spots": cfg["n"], "skipped": "failed: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("stpred", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--width", type=int, default=None, help="token width (default 512 on cuda, 64 on cpu)")
    parser.add_argument("--heads", type=int, default=None, help="heads (default width // 64 on cuda, 2 on cpu)")
    parser.add_argument("--in-dim", type=int, default=None, help="embedding width (default 1024 on cuda, 512 on cpu)")
    parser.add_argument("--genes", type=int, default=None, help="genes (default 2000 on cuda, 250 on cpu)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 on cuda, 3 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10 on cuda, 1 on cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dense-max-s", type=float, default=None, help="skip dense when a step would exceed this")
    parser.add_argument("--timeout", type=float, default=600.0, help="per worker")
    parser.add_argument(
        "--default-malloc", action="store_true", help="CPU: keep glibc's default mmap/trim thresholds in the workers"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    width = args.width or (512 if gpu else 64)
    cfg = {
        "device": device,
        "width": width,
        "heads": args.heads or (max(1, width // 64) if gpu else 2),
        "in_dim": args.in_dim or (1024 if gpu else 512),
        "genes": args.genes or (2000 if gpu else 250),
        "repeats": args.repeats or (10 if gpu else 3),
        "warmup": args.warmup if args.warmup is not None else (10 if gpu else 1),
        "threads": args.threads,
        "malloc_reuse": device == "cpu" and not args.default_malloc,
    }
    dense_max_s = args.dense_max_s or (30.0 if gpu else 40.0)
    results = []
    for model in ("hist", "dense"):
        prev = None
        for n in sorted(args.sizes):
            if model == "dense" and prev is not None and "train_s" in prev:
                est = prev["train_s"] * (n / prev["n_spots"]) ** 2
                if est > dense_max_s:
                    results.append(
                        {
                            "model": model,
                            "n_spots": n,
                            "skipped": f"estimated {est:.0f} s per training step (N^2 from {prev['n_spots']} spots) "
                            f"> --dense-max-s {dense_max_s:.0f}",
                        }
                    )
                    continue
            t = time.perf_counter()
            res = _run_worker({**cfg, "model": model, "n": n}, args.timeout)
            res["wall_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(res), flush=True)
            results.append(res)
            prev = res

    def get(model, n, key):
        for r in results:
            if r["model"] == model and r["n_spots"] == n and key in r:
                return r[key]
        return None

    ratios = {}
    for key in ("train_s", "infer_s", "train_aug_s", "train_min_s", "infer_min_s", "train_aug_min_s"):
        a, b = get("hist", 100000, key), get("hist", 10000, key)
        if a and b:
            ratios[f"hist_{key}_100k_over_10k"] = round(a / b, 2)
    for n in sorted(args.sizes):
        for key in ("train_s", "infer_s", "train_min_s", "infer_min_s", "train_peak_mb"):
            d, h = get("dense", n, key), get("hist", n, key)
            if d and h:
                ratios[f"dense_over_hist_{key}_{n}"] = round(d / h, 2)

    device_name = torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine())
    out = {
        "benchmark": "bench_hist",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "config": {**cfg, "depth": 6, "hist_layout": "111-21", "window": 3, "dense_max_s": dense_max_s},
        "slide": "Visium-like hex grid, 100 µm pitch, 55 µm lattice unit; random embeddings and targets",
        "results": results,
        "ratios": ratios,
    }
    path = Path(args.out) if args.out else HERE / "results" / f"hist_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
