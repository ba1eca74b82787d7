"""Checkpoint hygiene and resumable training.

A fit killed with SIGKILL and resumed with ``tl.fit(resume=True)`` ends with the weights and history of an
uninterrupted fit, bit for bit on the CPU: HiFusion killed mid-epoch (single phase), a tiny MMAP killed in phase 2,
and a tiny two-phase model (``_twophase.py``) whose phase-2 ``prepare_slides`` draws from the global RNG, killed in
phase 2. Every fit writes into its own run folder; temporary checkpoint folders never outlive ``fit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

import stpred

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _twophase import NAME, register_two_phase  # noqa: E402

JOB = HERE / "_resume_job.py"


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run([sys.executable, str(JOB), *args], env=env, capture_output=True, text=True, timeout=600)


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "run.json").is_file())


def _kill_resume_and_compare(tmp_path: Path, model: str, kill: tuple[int, int, int]) -> dict:
    root = tmp_path / "runs"
    killed = _job(model, str(root), str(tmp_path / "never.pt"), "--kill", *map(str, kill))
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no finally, no cleanup ran
    (run,) = _run_dirs(root)
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "running"
    phase, epoch, _ = kill
    assert sorted(state["completed"]) == [str(p) for p in range(1, phase)]
    if epoch > 0:
        assert (run / f"phase{phase}" / "last.ckpt").is_file()

    done = _job(model, str(root), str(tmp_path / "resumed.pt"), "--resume", "--reference", str(tmp_path / "ref"),
                str(tmp_path / "reference.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    assert resumed["info"]["resumed"]
    assert not reference["info"]["resumed"]
    assert resumed["info"]["run_dir"] == str(run.absolute())  # continued in its own folder, no new one
    assert _run_dirs(root) == [run]
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert pd.DataFrame(resumed["history"]).equals(pd.DataFrame(reference["history"]))  # NaN where a phase logs none
    assert {p: b["epoch"] for p, b in resumed["info"]["best"].items()} == {
        p: b["epoch"] for p, b in reference["info"]["best"].items()
    }
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished"
    assert not list(run.glob("phase*/last.ckpt"))  # only kept while a phase runs
    return resumed


@pytest.mark.slow
def test_hifusion_killed_mid_epoch_resumes_bit_identical(tmp_path):
    # killed in epoch 2 (of 4): epochs 0-1 come from last.ckpt with optimiser, schedule, early stopping and RNG
    resumed = _kill_resume_and_compare(tmp_path, "hifusion", (1, 2, 1))
    assert resumed["history"]["epoch"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_mmap_killed_in_phase_two_resumes_bit_identical(tmp_path):
    # phase 1 is restored from its final weights, phase 2 re-encodes and rebuilds its prototypes, then continues
    resumed = _kill_resume_and_compare(tmp_path, "mmap", (2, 1, 1))
    assert resumed["history"]["phase"] == [1] * 4 + [2] * 4


@pytest.mark.slow
def test_two_phase_model_killed_in_phase_two_resumes_bit_identical(tmp_path):
    # phase 1 is restored from its final weights, phase 2's prepare_slides re-runs from the saved RNG state
    resumed = _kill_resume_and_compare(tmp_path, NAME, (2, 1, 0))
    assert resumed["history"]["phase"] == [1] * 4 + [2] * 4


# ------------------------------------------------------------------------------------ in-process: hygiene, refusals
@pytest.fixture(scope="module")
def prepared():
    register_two_phase()
    sdata = stpred.datasets.synthetic(n_sections=2, n_genes=12, seed=3, n_patients=1, grid=7, pitch=96)
    stpred.pp.select_genes(sdata, n_top=6)
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=16, context_size=None, progress=False)
    return sdata


FIT = {"max_epochs": 2, "batch_size": 8, "progress": False}


def _copy(sdata, **select):
    """A deep copy with its own patch bank (patch banks live in memory, per object)."""
    import spatialdata as sd

    sdata = sd.deepcopy(sdata)
    if select:
        stpred.pp.select_genes(sdata, overwrite=True, **select)
        stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=16, context_size=None, progress=False)
    return sdata


def _weights(predictor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in predictor.model.state_dict().items()}


class _Boom(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        msg = "boom"
        raise RuntimeError(msg)


def test_temporary_checkpoint_folders_are_removed(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    predictor = stpred.tl.fit(prepared, NAME, **FIT)
    # the training checkpoints are gone; only the predictor itself is kept, where the provenance points
    kept = sorted(tmp_path.glob("stpred_*"))
    assert [p.name.startswith("stpred_predictor_") for p in kept] == [True]
    assert not list(tmp_path.rglob("*.ckpt"))
    assert predictor.info["run_dir"] is None
    assert all(b["checkpoint"] is None for b in predictor.info["best"].values())
    recorded = prepared.tables["stpred"].uns["stpred"]["models"][NAME]["checkpoint"]
    assert Path(recorded).parent == kept[0]
    assert {p.name for p in Path(recorded).iterdir()} <= {"manifest.json", "weights.pt", "history.csv", "ood.npz"}
    stpred.tl.predict(prepared, NAME, key_added="from_disk", progress=False)
    np.testing.assert_array_equal(
        prepared.tables["stpred"].layers["from_disk"], predictor.predict(prepared, progress=False)
    )
    # a failing fit cleans up too, and keeps nothing
    with pytest.raises(RuntimeError, match="boom"):
        stpred.tl.fit(prepared, NAME, trainer_kwargs={"callbacks": [_Boom()]}, **FIT)
    assert sorted(tmp_path.glob("stpred_*")) == kept
    assert not list(tmp_path.rglob("*.ckpt"))


def test_two_fits_never_share_a_run_folder(prepared, tmp_path):
    import spatialdata as sd

    root = tmp_path / "runs"
    first, second = _copy(prepared), _copy(prepared)
    a = stpred.tl.fit(first, NAME, seed=1, trainer_kwargs={"default_root_dir": root}, **FIT)
    b = stpred.tl.fit(second, NAME, seed=2, trainer_kwargs={"default_root_dir": root}, **FIT)
    runs = _run_dirs(root)
    assert len(runs) == 2
    assert {a.info["run_dir"], b.info["run_dir"]} == {str(r.absolute()) for r in runs}
    assert a.info["checkpoint"] == str(Path(a.info["run_dir"]) / "predictor")
    assert Path(a.info["run_dir"]).name.startswith(f"{NAME}-")
    wa, wb = _weights(a), _weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    # each object's provenance points at its own saved predictor, whose weights are that fit's
    for sdata, predictor, weights in ((first, a, wa), (second, b, wb)):
        saved = sdata.tables["stpred"].uns["stpred"]["models"][NAME]["checkpoint"]
        assert saved == predictor.info["checkpoint"]
        loaded = stpred.tl.load(saved)
        assert all(torch.equal(loaded.model.state_dict()[k], weights[k]) for k in weights)
    # written and read back (a new session: nothing in memory), the first object predicts with the first model
    first.write(tmp_path / "first.zarr")
    back = sd.read_zarr(tmp_path / "first.zarr")
    stpred.pp.extract_patches(back, size=16, context_size=None, progress=False)
    stpred.tl.predict(back, NAME, key_added="reloaded", progress=False)
    np.testing.assert_array_equal(back.tables["stpred"].layers["reloaded"], a.predict(first, progress=False))


class _FailAfterPhaseOne(L.Callback):
    """Fail once training of phase 1 has ended (its last.ckpt written, the phase not yet recorded as done)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if int(pl_module.model.current_phase) == 1:
            msg = "interrupted"
            raise RuntimeError(msg)


def test_resume_after_early_stopping_in_process(prepared, tmp_path):
    # early stopping fires in phase 1 (epoch 3 of 8, lr 0.3); the fit then fails before phase 1 is recorded as
    # done. The resumed phase must stop at once (restored stop flag) and phase 2 must start from the RNG state of
    # the end of phase 1 (restored although no epoch runs), as in the uninterrupted fit.
    fit = {**FIT, "max_epochs": 8, "lr": 0.3, "plan_kwargs": {"early_stopping_patience": 1}}
    reference = stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": tmp_path / "ref"}, **fit)
    assert len(reference.history.query("phase == 1")) < 8
    root = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="interrupted"):
        stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": root, "callbacks": [_FailAfterPhaseOne()]},
                      **fit)
    (run,) = _run_dirs(root)
    assert (run / "phase1" / "last.ckpt").is_file()
    resumed = stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": root}, resume=True, **fit)
    assert resumed.history.equals(reference.history)
    wr, wx = _weights(reference), _weights(resumed)
    assert all(torch.equal(wr[k], wx[k]) for k in wr)


def test_resume_of_a_finished_run_restores_it_without_training(prepared, tmp_path):
    root = tmp_path / "runs"
    done = stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": root}, **FIT)
    again = stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": root}, resume=True, **FIT)
    assert again.info["resumed"]
    assert again.info["run_dir"] == done.info["run_dir"]
    assert len(_run_dirs(root)) == 1
    wd, wa = _weights(done), _weights(again)
    assert all(torch.equal(wd[k], wa[k]) for k in wd)
    assert again.history.equals(done.history)
    # a run folder may be named directly
    direct = stpred.tl.fit(prepared, NAME, resume=done.info["run_dir"], **FIT)
    assert direct.info["run_dir"] == done.info["run_dir"]


def test_resume_refuses_other_settings_data_and_bad_arguments(prepared, tmp_path):
    root = tmp_path / "runs"
    stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": root}, **FIT)
    with pytest.raises(ValueError, match=r"plan\.lr: 0\.01 in the run, 0\.5 now"):
        stpred.tl.fit(prepared, NAME, trainer_kwargs={"default_root_dir": root}, resume=True, lr=0.5, **FIT)
    with pytest.raises(ValueError, match="seed: 0 in the run, 4 now"):
        stpred.tl.fit(prepared, NAME, resume=_run_dirs(root)[0], seed=4, **FIT)
    other = _copy(prepared, n_top=5)
    with pytest.raises(ValueError, match="gene panel differs"):
        stpred.tl.fit(other, NAME, trainer_kwargs={"default_root_dir": root}, resume=True, **FIT)
    with pytest.raises(ValueError, match="resume=True` needs the checkpoint folder"):
        stpred.tl.fit(prepared, NAME, resume=True, **FIT)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        stpred.tl.fit(prepared, NAME, resume=tmp_path / "missing", **FIT)
    with pytest.raises(FileNotFoundError, match="No 'hifusion' run to resume"):
        stpred.tl.fit(prepared, "hifusion", trainer_kwargs={"default_root_dir": root}, resume=True, **FIT)
    with pytest.raises(TypeError, match="Expected `resume`"):
        stpred.tl.fit(prepared, NAME, resume=1, **FIT)
    assert len(_run_dirs(root)) == 1  # refused calls leave no folder behind
    assert not [p for p in root.iterdir() if not (p / "run.json").is_file()]


def test_runner_refuses_a_folder_that_holds_a_run(prepared, tmp_path):
    from stpred.train import TensorStore, TrainRunner
    from stpred.train._state import read_state

    net = stpred.models.get_model(NAME)(n_genes=3)
    store = TensorStore({
        "spot": torch.zeros(8, 3, 16, 16, dtype=torch.uint8),
        "slide": torch.zeros(8, dtype=torch.long),
        "target": torch.randn(8, 3),
    })
    groups = [np.arange(6)], [np.arange(6, 8)]
    TrainRunner(net, store, *groups, plan=net.config.train, checkpoint_dir=tmp_path, progress=False).run()
    assert read_state(tmp_path)["status"] == "finished"
    with pytest.raises(FileExistsError, match="already holds a training run"):
        TrainRunner(net, store, *groups, plan=net.config.train, checkpoint_dir=tmp_path, progress=False).run()
