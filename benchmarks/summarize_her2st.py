"""Collect the pooled HER2 sample-specific metrics of every model beside the baseline into one table.

Reads ``benchmarks/results/her2st_<model>_<device>.json`` (written by ``her2st_protocol.py``) and writes
``benchmarks/results/her2st_summary_<device>.json`` plus a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ["mse", "mae", "pcc_gene", "pcc_spot", "pcc_flat", "r2_gene", "r2_flat"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = {}
    for path in sorted(RESULTS.glob(f"her2st_*_{args.device}.json")):
        if path.stem.startswith("her2st_summary"):
            continue
        data = json.loads(path.read_text())
        for key, values in data["pooled"].items():
            name = "baseline_mean" if key == "baseline_mean" else data["model"]
            entry = {m: values.get(m) for m in METRICS}
            if name != "baseline_mean":
                entry.update(config=data["config"], seconds=data["seconds"], date=data["date"])
                if "mmap_paper_metric" in data:
                    entry["mmap_paper_metric"] = data["mmap_paper_metric"]
            rows[name] = entry
    out = RESULTS / f"her2st_summary_{args.device}.json"
    out.write_text(json.dumps({"protocol": "sample-specific: train C2, test C3-C6 (pooled)", "rows": rows}, indent=2))
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name, entry in rows.items():
        cells = ["n/a" if entry[m] is None or entry[m] != entry[m] else f"{entry[m]:.4f}" for m in METRICS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
