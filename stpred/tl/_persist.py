"""Atomic, verified persistence of a :class:`~stpred.tl.Predictor`.

A saved predictor is a directory with ``weights.pt`` (the state dict), ``history.csv`` (per-epoch losses) and
``manifest.json``: format version, model name and config, gene panel, preprocessing recipe, provenance, and the
byte size and sha256 of every other file. Saving writes a temporary sibling directory and renames it into place
(an existing predictor is renamed aside first and deleted last), so a crash never leaves new weights beside old
metadata. Loading checks every file against the manifest and every tensor against the model the manifest builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .._provenance import dumps_json, plain, versions

if TYPE_CHECKING:
    from torch import nn

    from ._predictor import Predictor

#: Version of the on-disk layout; bump when a reader of the old version could misread the new one.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
HISTORY = "history.csv"
#: Metadata file of the layout before the manifest (read for compatibility, without checksums).
LEGACY_META = "predictor.json"
#: Out-of-distribution reference fitted by ``tl.fit`` (optional; see ``_ood``).
OOD = "ood.npz"
_OURS = {MANIFEST, WEIGHTS, HISTORY, LEGACY_META, OOD}


class PredictorFileError(ValueError):
    """A saved predictor is incomplete, corrupted, inconsistent or from a newer stpred; the message names the file.

    A subclass of :class:`ValueError`, raised by :func:`stpred.tl.load`.

    Examples
    --------
    >>> try:
    ...     predictor = stpred.tl.load("hifusion_c2")
    ... except stpred.tl.PredictorFileError as err:
    ...     print(err)  # e.g. ".../weights.pt is truncated: 1024 bytes, manifest.json says 52311. ..."
    """


# ---------------------------------------------------------------------------------------------------- save
def save_predictor(predictor: Predictor, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``predictor`` to the directory ``path`` atomically (see the module docstring) and return ``path``."""
    import torch

    path = Path(path)
    _check_target(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with open(tmp / WEIGHTS, "wb") as fh:
            torch.save(predictor.model.state_dict(), fh)
            _sync(fh)
        with open(tmp / HISTORY, "w", newline="") as fh:
            predictor.history.to_csv(fh, index=False)
            _sync(fh)
        from ._ood import save_reference

        save_reference(tmp, getattr(predictor, "ood_reference", None))
        manifest = {
            "format": "stpred.predictor",
            "format_version": FORMAT_VERSION,
            "model": predictor.name,
            "config": {"sizes": plain(predictor.sizes), "model_kwargs": plain(predictor.model_kwargs)},
            "genes": list(predictor.genes),
            "preprocessing": {"normalize": plain(predictor.normalize)},
            "info": plain({k: v for k, v in predictor.info.items() if k != "checkpoint"}),
            "versions": versions(),
            # sizes and checksums of what is on disk, read back after writing
            "files": {name: _fingerprint(tmp / name) for name in (WEIGHTS, HISTORY, OOD) if (tmp / name).is_file()},
        }
        with open(tmp / MANIFEST, "w") as fh:
            fh.write(dumps_json(manifest) + "\n")
            _sync(fh)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_target(path: Path, *, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        msg = f"{str(path)!r} is a file; a predictor is saved as a directory. Choose another path."
        raise FileExistsError(msg)
    if not path.is_dir():
        return
    names = {p.name for p in path.iterdir()}
    foreign = sorted(names - _OURS)
    if foreign:
        msg = (
            f"{str(path)!r} holds files that are not part of a saved predictor ({foreign[:5]}); saving would delete "
            "them. Choose a new or empty directory."
        )
        raise FileExistsError(msg)
    if names and not overwrite:
        msg = f"{str(path)!r} already holds a saved predictor; pass `overwrite=True` to replace it."
        raise FileExistsError(msg)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is renamed aside first and deleted only after the swap."""
    if not path.exists():
        os.replace(tmp, path)
        _sync_dir(path.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside)  # replaces the empty placeholder directory made by mkdtemp
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)  # put the previous predictor back
        raise
    _sync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _sync_dir(path: Path) -> None:
    # make the renames durable; not every platform can open a directory
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------------- load
def load_predictor(path: str | os.PathLike) -> Predictor:
    """Read and verify a predictor written by :func:`save_predictor` (or by stpred before the manifest)."""
    from ._predictor import Predictor

    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / LEGACY_META).is_file():
            manifest = _legacy_manifest(path)
        else:
            raise FileNotFoundError(_not_found(path))
    else:
        manifest = _read_manifest(path / MANIFEST)
        _check_files(path, manifest)
    model = _build_model(path, manifest)
    _load_weights(path / WEIGHTS, model, manifest)
    history = _read_history(path / HISTORY)
    info = dict(manifest.get("info") or {})
    info["checkpoint"] = str(path)
    predictor = Predictor(
        model,
        name=manifest["model"],
        genes=manifest["genes"],
        normalize=manifest["preprocessing"]["normalize"],
        sizes=manifest["config"]["sizes"],
        model_kwargs=manifest["config"]["model_kwargs"],
        history=history,
        info=info,
    )
    from ._ood import load_reference

    predictor.ood_reference = load_reference(path)
    return predictor


def _not_found(path: Path) -> str:
    msg = f"No saved predictor at {str(path)!r} (expected {MANIFEST}); save one with `Predictor.save`."
    if path.is_file() and (path.parent / MANIFEST).is_file():
        msg += f" {path.name!r} is a file of the predictor saved in {str(path.parent)!r}: pass that directory."
    elif path.parent.is_dir():
        left = sorted(p for p in path.parent.glob(f".{path.name}.old-*") if (p / MANIFEST).is_file())
        if left:
            msg += (
                f" An interrupted save left the previous predictor at {str(left[-1])!r}; rename it to "
                f"{str(path)!r} to use it."
            )
    return msg


def _read_manifest(file: Path) -> dict[str, Any]:
    raw = file.read_bytes()
    if not raw.strip():
        msg = f"{file} is empty: the save was interrupted. Save the predictor again."
        raise PredictorFileError(msg)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{file} is not valid JSON ({err}); it is truncated or corrupted. Save the predictor again."
        raise PredictorFileError(msg) from None
    if not isinstance(manifest, dict):
        msg = f"{file} holds a {type(manifest).__name__}, not a predictor manifest."
        raise PredictorFileError(msg)
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        msg = f"{file} has no integer `format_version` ({version!r}); it was not written by `Predictor.save`."
        raise PredictorFileError(msg)
    if version > FORMAT_VERSION:
        msg = (
            f"{file} was written by a newer stpred (predictor format version {version}; this stpred reads up to "
            f"{FORMAT_VERSION}). Upgrade stpred to load it."
        )
        raise PredictorFileError(msg)
    _require(file, manifest, ("model", "config", "genes", "preprocessing", "files"))
    _require(file, manifest["config"], ("sizes", "model_kwargs"), where="config")
    _require(file, manifest["preprocessing"], ("normalize",), where="preprocessing")
    if not isinstance(manifest["files"], dict) or WEIGHTS not in manifest["files"]:
        msg = f"{file} lists no checksum for {WEIGHTS}; it was not written by `Predictor.save`."
        raise PredictorFileError(msg)
    return manifest


def _require(file: Path, mapping: Any, keys: tuple[str, ...], *, where: str = "") -> None:
    missing = [k for k in keys if not isinstance(mapping, dict) or k not in mapping]
    if missing:
        place = f" under {where!r}" if where else ""
        msg = f"{file} lacks {missing}{place}; it is corrupted or was not written by `Predictor.save`."
        raise PredictorFileError(msg)


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest["files"].items():
        if Path(name).name != name or not isinstance(expected, dict):
            msg = f"{path / MANIFEST} has a malformed `files` entry {name!r}; it was not written by `Predictor.save`."
            raise PredictorFileError(msg)
        if not isinstance(expected.get("bytes"), int) or not isinstance(expected.get("sha256"), str):
            msg = f"{path / MANIFEST} lacks the size or sha256 of {name!r}; it is corrupted. Save the predictor again."
            raise PredictorFileError(msg)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            if name == HISTORY:
                warnings.warn(f"{file} is missing; the predictor loads without its training history.", stacklevel=4)
                continue
            msg = f"{file} is missing (listed in {MANIFEST}). The saved predictor is incomplete; save it again."
            raise PredictorFileError(msg)
        found = _fingerprint(file)
        if found["bytes"] != expected.get("bytes"):
            kind = "empty" if found["bytes"] == 0 else ("truncated" if found["bytes"] < expected["bytes"] else "changed")
            msg = (
                f"{file} is {kind}: {found['bytes']} bytes, {MANIFEST} says {expected['bytes']}. "
                "It was damaged or replaced after saving; save the predictor again."
            )
            raise PredictorFileError(msg)
        if found["sha256"] != expected.get("sha256"):
            msg = (
                f"{file} fails its checksum (sha256 {found['sha256'][:12]}…, {MANIFEST} says "
                f"{expected['sha256'][:12]}…): it is not the file saved with this manifest. Save the "
                "predictor again."
            )
            raise PredictorFileError(msg)


def _legacy_manifest(path: Path) -> dict[str, Any]:
    """A manifest from the layout before format version 1 (``predictor.json``; no checksums)."""
    file = path / LEGACY_META
    if not (path / WEIGHTS).is_file():
        msg = f"{path / WEIGHTS} is missing (next to {LEGACY_META}). The saved predictor is incomplete."
        raise PredictorFileError(msg)
    raw = file.read_bytes()
    try:
        meta = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or not {"model", "genes", "normalize", "sizes", "model_kwargs"} <= set(meta):
        msg = f"{file} is empty, truncated or corrupted. Save the predictor again."
        raise PredictorFileError(msg)
    warnings.warn(
        f"{path} was saved by an older stpred without checksums; load it and save it again to verify future loads.",
        stacklevel=4,
    )
    return {
        "model": meta["model"],
        "config": {"sizes": meta["sizes"], "model_kwargs": meta["model_kwargs"]},
        "genes": meta["genes"],
        "preprocessing": {"normalize": meta["normalize"]},
        "info": meta.get("info", {}),
    }


def _build_model(path: Path, manifest: dict[str, Any]) -> nn.Module:
    from ..models import get_model
    from ..models._base import RandomWeightsWarning

    name = manifest["model"]
    file = path / (MANIFEST if (path / MANIFEST).is_file() else LEGACY_META)
    try:
        cls = get_model(name)
    except (ValueError, TypeError) as err:
        msg = f"{file} names model {name!r}, which this stpred cannot build: {err} Import the package that registers it."
        raise PredictorFileError(msg) from None
    sizes = dict(manifest["config"]["sizes"])
    # weight files named at training time are not needed (their tensors are in weights.pt) and may not exist here
    kwargs = {
        k: (None if k.endswith("weights") and isinstance(v, str) else v)
        for k, v in dict(manifest["config"]["model_kwargs"]).items()
    }
    try:
        with warnings.catch_warnings():
            # the weights come from the file, so a warning about random initial weights does not apply
            warnings.simplefilter("ignore", RandomWeightsWarning)
            return cls.from_sizes(sizes, **kwargs)
    except (TypeError, ValueError) as err:
        msg = f"The config in {file} does not build a {name!r} model ({err}). It is corrupted or from another version."
        raise PredictorFileError(msg) from None


def _load_weights(file: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle/EOF/zip errors depending on the damage
        msg = f"{file} cannot be read as saved weights ({type(err).__name__}: {err}). Save the predictor again."
        raise PredictorFileError(msg) from None
    if not isinstance(state, dict):
        msg = f"{file} holds a {type(state).__name__}, not a state dict of tensors."
        raise PredictorFileError(msg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        msg = (
            f"{file} does not match the {manifest['model']!r} model built from the manifest config "
            f"({len(missing)} missing tensors, first {missing[:3]}; {len(unexpected)} unexpected, first "
            f"{unexpected[:3]}). The weights and the manifest come from different models; save the predictor again."
        )
        raise PredictorFileError(msg)
    try:
        # shapes are checked by torch: some models size buffers from the state dict (e.g. MMAP's prototype bank)
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = "; ".join([line for line in lines if "size mismatch" in line][:3] or lines[-3:])
        msg = (
            f"{file} does not match the {manifest['model']!r} model built from the manifest config ({detail}). The "
            "weights and the manifest come from different models; save the predictor again."
        )
        raise PredictorFileError(msg) from None
    model.eval()


def _read_history(file: Path) -> pd.DataFrame:
    if not file.is_file() or file.stat().st_size <= 1:
        return pd.DataFrame()
    try:
        return pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        msg = f"{file} cannot be read as a CSV table ({err}). Delete it to load the predictor without its history."
        raise PredictorFileError(msg) from None
