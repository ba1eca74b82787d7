"""Run a tutorial notebook in its full configuration and keep what it measured.

Executes ``tutorials/<name>.ipynb`` with ``STPRED_TUTORIAL_FAST`` unset (the real configuration, not the tiny one
the test suite runs), times every cell, writes the executed notebook beside the results (git-ignored by default:
it holds figures) and a JSON record under ``benchmarks/results/`` with, per code cell, its seconds and its text
outputs (printed lines and the plain-text form of returned tables), the machine's load and the versions.

Usage::

    python benchmarks/run_tutorial.py 03_he_only            # writes benchmarks/results/tutorial_03_he_only_cpu.json
    python benchmarks/run_tutorial.py 03_he_only --executed /tmp/03_full.ipynb
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path
from typing import Any

import nbclient
import nbformat

from stpred._provenance import versions, write_json

ROOT = Path(__file__).resolve().parents[1]


def _text(outputs: list[Any]) -> list[str]:
    """Printed text and the plain-text form of results; figures are named, not stored."""
    out = []
    for item in outputs:
        if item.get("output_type") == "stream" and item.get("name") == "stdout":
            out.append(item["text"])
        elif item.get("output_type") in ("execute_result", "display_data"):
            data = item.get("data", {})
            out.append(data["text/plain"] if "image/png" not in data else "<figure>")
        elif item.get("output_type") == "error":
            out.append(f"{item['ename']}: {item['evalue']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="notebook name in tutorials/ without .ipynb, or a path to a notebook")
    parser.add_argument("--out", default=None, help="JSON record (default benchmarks/results/tutorial_<name>_cpu.json)")
    parser.add_argument("--executed", default=None, help="where to write the executed notebook (default: not kept)")
    args = parser.parse_args()

    path = Path(args.name) if args.name.endswith(".ipynb") else ROOT / "tutorials" / f"{args.name}.ipynb"
    name = path.stem
    nb = nbformat.read(path, as_version=4)
    os.environ.pop("STPRED_TUTORIAL_FAST", None)
    cells: list[dict[str, Any]] = []
    start = last = time.perf_counter()
    load_before = os.getloadavg()

    def done(cell: Any, cell_index: int, execute_reply: Any) -> None:
        nonlocal last
        now = time.perf_counter()
        cells.append({"cell": cell_index, "seconds": round(now - last, 1), "load_1min": round(os.getloadavg()[0], 2)})
        print(f"cell {cell_index}: {now - last:.0f} s (total {now - start:.0f} s)", flush=True)
        last = now

    client = nbclient.NotebookClient(
        nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}, on_cell_executed=done
    )
    error = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        error = str(err).splitlines()[-1] if str(err) else type(err).__name__
    total = time.perf_counter() - start
    for entry in cells:
        entry["outputs"] = _text(nb.cells[entry["cell"]].get("outputs", []))
    record = {
        "notebook": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "configuration": "full (STPRED_TUTORIAL_FAST unset)",
        "completed": error is None,
        "error": error,
        "total_seconds": round(total, 1),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "device": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "versions": versions(),
        "cells": cells,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"tutorial_{name}_cpu.json"
    write_json(out, record)
    if args.executed:
        nbformat.write(nb, args.executed)
    print(f"{'completed' if error is None else 'failed: ' + error} in {total / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
