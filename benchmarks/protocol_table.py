"""Markdown table of a ``tl.benchmark`` JSON file (as written by ``benchmarks/her2st_protocol.py``).

Per model: pcc_gene per test section averaged over sections (the headline, mean ± sd over seeds), pcc_gene pooled
over the test spots (labelled), MSE, genes excluded from pcc_gene, share of genes with r > 0.3, and the paired
per-gene PCC difference to each baseline with its 95 % bootstrap interval over genes (bounds averaged over seeds).

Examples
--------
python benchmarks/protocol_table.py benchmarks/results/her2st_protocol_cpu_cpu.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

import pandas as pd


def table(*paths: str) -> str:
    """One table from one or more JSON files of the same protocol (a model and seed found twice is kept once)."""
    bodies = [json.loads(open(p).read()) for p in paths]
    frames, seen = [], set()
    for body in bodies:
        frame = pd.DataFrame(body["scores"])
        runs = set(zip(frame["model"], frame["seed"]))
        frame = frame[[(m, s) not in seen for m, s in zip(frame["model"], frame["seed"])]]
        seen |= runs
        frames.append(frame)
    scores = pd.concat(frames, ignore_index=True)
    body = bodies[0]
    status = ", ".join(f"{p}: {b['protocol'].get('status', 'unknown')}" for p, b in zip(paths, bodies))
    per_section = scores[~scores["section"].isin(["mean_over_sections", "pooled"])]
    pooled = scores[scores["section"] == "pooled"]
    head = scores[scores["section"] == "mean_over_sections"]
    seconds = {}
    for b in bodies:
        for fold in b["protocol"]["folds"]:
            for run, info in fold["validation"].items():
                seconds.setdefault(run.split("/")[0], []).append(info.get("seconds"))

    def stat(frame: pd.DataFrame, model: str, metric: str) -> tuple[float, float, int]:
        sub = frame[(frame["model"] == model) & (frame["metric"] == metric)]
        per_seed = sub.groupby("seed")["value"].mean()
        return per_seed.mean(), per_seed.std(), len(per_seed)

    def fmt(mean: float, sd: float, n: int) -> str:
        if pd.isna(mean):
            return "undefined"
        return f"{mean:.3f} ± {sd:.3f}" if n > 1 else f"{mean:.3f}"

    models = list(dict.fromkeys(scores["model"]))
    baselines = [b for b in ("mean", "ridge") if b in models]
    cols = ["model", "seeds", "pcc_gene (mean over sections)", "pcc_gene (pooled)", "MSE", "genes excluded",
            "share r > 0.3", *[f"Δ pcc_gene vs {b} [95 % CI, genes]" for b in baselines], "s per fit"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in models:
        n_seeds = scores.loc[scores["model"] == m, "seed"].nunique()
        row = [m, str(n_seeds)]
        row.append(fmt(*stat(per_section, m, "pcc_gene")))
        row.append(fmt(*stat(pooled, m, "pcc_gene")))
        row.append(fmt(*stat(per_section, m, "mse")))
        row.append(f"{stat(per_section, m, 'n_genes_excluded')[0]:.0f}")
        row.append(f"{stat(per_section, m, 'frac_genes_pcc_gt_0.3')[0]:.2f}")
        for b in baselines:
            sub = head[(head["model"] == m) & (head["metric"] == "pcc_gene_diff") & (head["comparator"] == b)]
            if sub.empty:
                row.append("—")
                continue
            d = sub.groupby("seed")[["value", "ci_low_genes", "ci_high_genes"]].mean().mean()
            row.append(f"{d['value']:+.3f} [{d['ci_low_genes']:+.3f}, {d['ci_high_genes']:+.3f}]")
        secs = [s for s in seconds.get(m, []) if s is not None]
        row.append(f"{sum(secs) / len(secs):.0f}" if secs else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nprotocol: {body['protocol']['name']}; status: {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*sys.argv[1:]))
