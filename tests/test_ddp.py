"""Multi-process data-parallel training (DDP) through `tl.fit`, on two CPU processes with the gloo backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import stpred
    from stpred.models.hifusion import TINY_CONFIG

    sdata = stpred.datasets.synthetic(n_sections=2, n_genes=10, seed=0, grid=6)
    stpred.pp.select_genes(sdata, n_top=5)
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=64, context_size=128, progress=False)
    predictor = stpred.tl.fit(
        sdata, "hifusion", max_epochs=2, batch_size=8, progress=False, **TINY_CONFIG,
        trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "default_root_dir": sys.argv[1]},
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))
    pred = predictor.predict(sdata, progress=False)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump({"shape": list(pred.shape), "finite": bool(np.isfinite(pred).all()),
                   "epochs": len(predictor.history), "sum": float(pred.sum())}, fh)
    """
)


@pytest.mark.slow
def test_fit_with_ddp_on_two_cpu_processes(tmp_path):
    import json

    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["finite"]
        assert r["epochs"] == 2
        assert r["shape"][1] == 5
    # both processes end with the same (synchronised) weights, hence the same predictions
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-5)
