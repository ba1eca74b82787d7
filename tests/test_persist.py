"""Atomic, verified predictor persistence: every damaged, mixed-up or foreign file is refused, naming the file."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import stpred
from stpred.models import StpredModel, register_model
from stpred.tl import Predictor, PredictorFileError, _persist


@register_model("toy_persist")
class _ToyPersist(StpredModel):
    inputs = ("spot",)
    batching = "spots"

    def __init__(self, n_genes: int, *, width: int = 4) -> None:
        super().__init__()
        self.config = SimpleNamespace(n_genes=n_genes, width=width)
        self.body = nn.Linear(3, width)
        self.head = nn.Linear(width, n_genes)


def _predictor(width: int = 4, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    return Predictor(
        _ToyPersist(3, width=width),
        name="toy_persist",
        genes=["a", "b", "c"],
        normalize={"method": "log1p"},
        sizes={"n_genes": 3},
        model_kwargs={"width": width},
        history=pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5], "val_loss": [np.nan, 0.6]}),
        info={"seed": seed, "best_val": float("nan"), "train_sections": ["S0"]},
    )


def _same_weights(a: Predictor, b: Predictor) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_writes_a_strict_manifest(tmp_path):
    pred = _predictor()
    out = pred.save(tmp_path / "p")
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "manifest.json", "weights.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert manifest["format_version"] == _persist.FORMAT_VERSION
    assert manifest["model"] == "toy_persist"
    assert manifest["config"] == {"sizes": {"n_genes": 3}, "model_kwargs": {"width": 4}}
    assert manifest["genes"] == ["a", "b", "c"]
    assert manifest["preprocessing"] == {"normalize": {"method": "log1p"}}
    assert manifest["info"]["best_val"] is None  # NaN written as null
    assert set(manifest["files"]) == {"weights.pt", "history.csv"}
    assert manifest["files"]["weights.pt"]["bytes"] == (out / "weights.pt").stat().st_size
    loaded = stpred.tl.load(out)
    assert _same_weights(pred, loaded)
    assert loaded.genes == pred.genes
    assert loaded.normalize == pred.normalize
    assert loaded.name == "toy_persist"
    assert loaded.info["checkpoint"] == str(out)
    assert math.isnan(loaded.history["val_loss"][0])


def test_overwrite_replaces_and_refusal_keeps_the_old_one(tmp_path):
    old, new = _predictor(seed=0), _predictor(seed=1)
    old.save(tmp_path / "p")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        new.save(tmp_path / "p")
    assert _same_weights(stpred.tl.load(tmp_path / "p"), old)
    new.save(tmp_path / "p", overwrite=True)
    assert _same_weights(stpred.tl.load(tmp_path / "p"), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing renamed aside is left


def test_save_refuses_a_folder_with_other_files_and_a_file(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not part of a saved predictor \(\['notes.txt'\]\)"):
        _predictor().save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        _predictor().save(tmp_path / "f")


@pytest.mark.parametrize("stage", ["weights", "history", "manifest", "rename"])
def test_crash_during_save_leaves_the_previous_predictor(tmp_path, monkeypatch, stage):
    old = _predictor(seed=0)
    old.save(tmp_path / "p")

    def boom(*args, **kwargs):
        msg = "disk full (simulated)"
        raise OSError(msg)

    if stage == "weights":
        monkeypatch.setattr(torch, "save", boom)
    elif stage == "history":
        monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    elif stage == "manifest":
        monkeypatch.setattr(_persist, "dumps_json", boom)
    else:
        real = _persist.os.replace
        calls = []

        def second_fails(src, dst):  # the old predictor is renamed aside, then moving the new one in fails
            calls.append(src)
            if len(calls) == 2:
                msg = "rename failed (simulated)"
                raise OSError(msg)
            return real(src, dst)

        monkeypatch.setattr(_persist.os, "replace", second_fails)
    with pytest.raises(OSError, match="simulated"):
        _predictor(seed=1).save(tmp_path / "p", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # the temporary folder is gone
    assert _same_weights(stpred.tl.load(tmp_path / "p"), old)


def test_crash_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        _predictor().save(tmp_path / "p")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="No saved predictor"):
        stpred.tl.load(tmp_path / "p")


def test_load_points_to_a_predictor_left_aside_by_a_killed_save(tmp_path):
    _predictor().save(tmp_path / "p")
    (tmp_path / "p").rename(tmp_path / ".p.old-x1")  # killed between "rename old aside" and "rename new in"
    with pytest.raises(FileNotFoundError, match=r"interrupted save left the previous predictor at .*\.p\.old-x1"):
        stpred.tl.load(tmp_path / "p")


@pytest.fixture
def saved(tmp_path):
    return _predictor().save(tmp_path / "p")


def test_missing_files(saved):
    (saved / "weights.pt").unlink()
    with pytest.raises(PredictorFileError, match=r"weights\.pt is missing \(listed in manifest\.json\)"):
        stpred.tl.load(saved)
    with pytest.raises(FileNotFoundError, match=r"'manifest.json' is a file of the predictor saved in .*pass that dir"):
        stpred.tl.load(saved / "manifest.json")
    (saved / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"No saved predictor .*expected manifest\.json"):
        stpred.tl.load(saved)


def test_missing_history_is_optional(saved):
    (saved / "history.csv").unlink()
    with pytest.warns(UserWarning, match="history.csv is missing; the predictor loads without its training history"):
        loaded = stpred.tl.load(saved)
    assert loaded.history.empty


@pytest.mark.parametrize(
    ("name", "damage", "match"),
    [
        ("weights.pt", lambda b: b[: len(b) // 2], r"weights\.pt is truncated: \d+ bytes, manifest\.json says"),
        ("weights.pt", lambda b: b"", r"weights\.pt is empty: 0 bytes"),
        ("weights.pt", lambda b: b[:-1] + bytes([b[-1] ^ 1]), r"weights\.pt fails its checksum"),
        ("history.csv", lambda b: b.replace(b"0.5", b"0.4"), r"history\.csv fails its checksum"),
        ("manifest.json", lambda b: b"", r"manifest\.json is empty: the save was interrupted"),
        ("manifest.json", lambda b: b[: len(b) // 2], r"manifest\.json is not valid JSON .*truncated"),
        ("manifest.json", lambda b: b"[1, 2]", r"manifest\.json holds a list"),
    ],
    ids=["truncated", "empty", "bitflip", "history-edited", "manifest-empty", "manifest-truncated", "manifest-list"],
)
def test_damaged_files(saved, name, damage, match):
    file = saved / name
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(PredictorFileError, match=match):
        stpred.tl.load(saved)


def _edit_manifest(saved, edit):
    manifest = json.loads((saved / "manifest.json").read_text())
    edit(manifest)
    (saved / "manifest.json").write_text(json.dumps(manifest))


def test_newer_format_and_unknown_model(saved):
    _edit_manifest(saved, lambda m: m.update(format_version=_persist.FORMAT_VERSION + 1))
    with pytest.raises(PredictorFileError, match=r"manifest\.json was written by a newer stpred .*Upgrade stpred"):
        stpred.tl.load(saved)
    _edit_manifest(saved, lambda m: m.update(format_version=_persist.FORMAT_VERSION, model="no_such_model"))
    with pytest.raises(PredictorFileError, match=r"manifest\.json names model 'no_such_model'.*Registered models"):
        stpred.tl.load(saved)
    _edit_manifest(saved, lambda m: m.pop("genes"))
    with pytest.raises(PredictorFileError, match=r"manifest\.json lacks \['genes'\]"):
        stpred.tl.load(saved)
    _edit_manifest(saved, lambda m: m.update(genes=["a", "b", "c"], files={"weights.pt": {"sha256": "0" * 64}}))
    with pytest.raises(PredictorFileError, match=r"manifest\.json lacks the size or sha256 of 'weights.pt'"):
        stpred.tl.load(saved)
    _edit_manifest(saved, lambda m: m.update(files={"weights.pt": {"sha256": "0", "bytes": 1}, "../x": {}}))
    with pytest.raises(PredictorFileError, match=r"malformed `files` entry '../x'"):
        stpred.tl.load(saved)


def test_weights_of_another_model_are_refused(saved, tmp_path):
    # a consistent folder (checksums match) whose weights come from a wider model than the manifest describes
    other = _predictor(width=6).save(tmp_path / "wide")
    _edit_manifest(other, lambda m: m["config"]["model_kwargs"].update(width=4))
    with pytest.raises(PredictorFileError, match=r"wide/weights\.pt does not match the 'toy_persist' model .*shape"):
        stpred.tl.load(other)
    # weights with a renamed tensor, re-fingerprinted so that only the key check can catch it
    state = {("trunk.weight" if k == "body.weight" else k): v for k, v in _predictor().model.state_dict().items()}
    torch.save(state, saved / "weights.pt")
    fp = _persist._fingerprint(saved / "weights.pt")
    _edit_manifest(saved, lambda m: m["files"].update({"weights.pt": fp}))
    with pytest.raises(PredictorFileError, match=r"1 missing tensors, first \['body.weight'\]; 1 unexpected"):
        stpred.tl.load(saved)
    # a config the model class does not accept
    _edit_manifest(saved, lambda m: m["config"]["model_kwargs"].update(depth=3))
    with pytest.raises(PredictorFileError, match=r"config in .*manifest\.json does not build a 'toy_persist' model"):
        stpred.tl.load(saved)


def test_unreadable_weights_with_matching_checksum(saved):
    (saved / "weights.pt").write_bytes(b"not a torch file")
    fp = _persist._fingerprint(saved / "weights.pt")
    _edit_manifest(saved, lambda m: m["files"].update({"weights.pt": fp}))
    with pytest.raises(PredictorFileError, match=r"weights\.pt cannot be read as saved weights"):
        stpred.tl.load(saved)


def test_previous_format_still_loads(tmp_path):
    pred = _predictor()
    old = tmp_path / "old"
    old.mkdir()
    torch.save(pred.model.state_dict(), old / "weights.pt")
    meta = {"model": "toy_persist", "genes": pred.genes, "normalize": pred.normalize, "sizes": pred.sizes}
    (old / "predictor.json").write_text(json.dumps({**meta, "model_kwargs": {"width": 4}, "info": {}}))
    with pytest.warns(UserWarning, match="older stpred without checksums"):
        loaded = stpred.tl.load(old)
    assert _same_weights(pred, loaded)
    assert loaded.history.empty
    (old / "predictor.json").write_text('{"model": "toy_pers')
    with pytest.raises(PredictorFileError, match=r"predictor\.json is empty, truncated or corrupted"):
        stpred.tl.load(old)


def test_mmap_prototype_bank_sized_by_the_saved_state(tmp_path):
    # MMAP sizes its prototype-bank buffers from the state dict: the load check must not refuse them
    from stpred.models.mmap import MMAP

    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    kwargs = {"backbone": "vit", "backbone_kwargs": vit, "lora_blocks": 2, "lora_rank": 4, "proto_k_min": 2, "proto_k_max": 4}
    kwargs |= {"attn_heads": 2, "attn_dim_head": 8}
    model = MMAP(5, **kwargs)
    model.proto_bank = torch.randn(2, 4, model.proto_bank.shape[-1])
    model.proto_mask = torch.ones(2, 4, dtype=torch.bool)
    model.proto_slides = torch.arange(2)
    pred = Predictor(model, name="mmap", genes=list("abcde"), normalize={"method": "log1p"}, sizes={"n_genes": 5},
                     model_kwargs=kwargs)
    pred.save(tmp_path / "m")
    loaded = stpred.tl.load(tmp_path / "m")
    assert _same_weights(pred, loaded)
    assert loaded.model.proto_bank.shape == (2, 4, model.proto_bank.shape[-1])
