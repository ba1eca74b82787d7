"""A small fit run as a subprocess by ``test_resume.py``: optionally SIGKILLed mid-way, optionally resumed.

Usage: ``python _resume_job.py MODEL ROOT OUT [--kill PHASE EPOCH BATCH] [--resume] [--reference ROOT2 OUT2]``.
Writes the final ``state_dict``, history and provenance of the fit to ``OUT`` (``torch.save``); with
``--reference``, then runs an uninterrupted fit into ``ROOT2`` and writes it to ``OUT2``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import lightning as L
import torch

torch.set_num_threads(1)

import stpred  # noqa: E402
from stpred.models.hifusion import TINY_CONFIG  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _twophase import register_two_phase  # noqa: E402


class Kill(L.Callback):
    """SIGKILL this process at batch ``batch`` of epoch ``epoch`` of phase ``phase``."""

    def __init__(self, phase: int, epoch: int, batch: int) -> None:
        self.phase, self.epoch, self.batch = phase, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        phase = int(getattr(pl_module.model, "current_phase", torch.tensor(1)))
        if (phase, trainer.current_epoch, batch_idx) == (self.phase, self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def fit(model: str, root: str, out: str, *, kill: list[int] | None = None, resume: bool = False) -> None:
    """Prepare the data, fit (SIGKILLed at ``kill`` if given), write the result to ``out``."""
    sdata = stpred.datasets.synthetic(n_sections=2, n_genes=12, seed=3, n_patients=1, grid=7, pitch=96)
    stpred.pp.select_genes(sdata, n_top=6)
    stpred.pp.normalize(sdata)
    if model == "hifusion":
        options = {**TINY_CONFIG, "spot_size": 32, "context_size": 64, "width": 4}
        stpred.pp.extract_patches(sdata, size=32, context_size=64, progress=False)
    elif model == "mmap":
        vit = {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}
        options = {"backbone": "vit", "backbone_kwargs": vit, "lora_blocks": 2, "lora_rank": 2, "attn_heads": 2,
                   "attn_dim_head": 8, "proto_k_min": 2, "proto_k_max": 8}
        stpred.pp.extract_patches(sdata, size=32, context_size=None, progress=False)
    else:
        register_two_phase()
        options = {}
        stpred.pp.extract_patches(sdata, size=16, context_size=None, progress=False)
    predictor = stpred.tl.fit(
        sdata,
        model,
        max_epochs=4,
        batch_size=8,
        progress=False,
        plan_kwargs={"early_stopping_patience": 3},
        trainer_kwargs={"default_root_dir": root, "callbacks": [Kill(*kill)] if kill else []},
        resume=resume,
        **options,
    )
    torch.save(
        {
            "state_dict": predictor.model.state_dict(),
            "history": predictor.history.to_dict("list"),
            "info": {k: predictor.info[k] for k in ("run_dir", "checkpoint", "resumed", "best")},
        },
        out,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--kill", nargs=3, type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--reference", nargs=2, help="then an uninterrupted fit: ROOT OUT")
    args = parser.parse_args()
    fit(args.model, args.root, args.out, kill=args.kill, resume=args.resume)
    if args.reference:
        fit(args.model, *args.reference)


if __name__ == "__main__":
    main()
