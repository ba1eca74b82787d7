"""The state of a resumable run: its folder layout, the ``run.json`` state file, RNG snapshots and run matching.

A run folder holds ``run.json`` (what was asked for and which phases are done) and, per phase ``p``,
``phase<p>/last.ckpt`` (full Lightning state of the last finished epoch, while the phase runs),
``phase<p>/best.ckpt`` (weights of the best validation epoch) and ``phase<p>/final.pt`` (the weights the model
holds when the phase is done, its history and the RNG state to start the next phase from).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: File names inside a run folder.
STATE_FILE = "run.json"
LAST = "last.ckpt"
FINAL = "final.pt"
#: Version of the ``run.json`` layout.
STATE_FORMAT = 1


def phase_dir(run_dir: str | os.PathLike, phase: int) -> Path:
    """Folder of phase ``phase`` inside ``run_dir``."""
    return Path(run_dir) / f"phase{int(phase)}"


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA), as plain types and tensors.

    The result loads with ``torch.load(weights_only=True)`` (the NumPy key array is stored as a tensor).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a torn file behind (temporary file, then rename)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _canonical(value: Any) -> Any:
    """``value`` as JSON-ready plain types (tuples → lists, numpy scalars → Python, NaN → None)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` of ``run_dir``; a clear error when it is missing or unreadable."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        msg = f"{str(run_dir)!r} is not an stpred run folder (no {STATE_FILE}); pass the folder a fit wrote into."
        raise FileNotFoundError(msg)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        msg = f"The run state {str(path)!r} is unreadable ({err}); this run cannot be resumed, start a new fit."
        raise ValueError(msg) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        msg = f"{str(path)!r} has run-state format {found!r}; this stpred reads format {STATE_FORMAT}."
        raise ValueError(msg)
    return state


def write_state(run_dir: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``run.json`` atomically (strict JSON)."""
    state = {**state, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_bytes(Path(run_dir) / STATE_FILE, json.dumps(_canonical(state), indent=2, allow_nan=False).encode())


# ---------------------------------------------------------------------------------------------------- matching
def _hash_tensor(h: Any, tensor: torch.Tensor) -> None:
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(memoryview(array).cast("B"))


def fingerprint(
    *,
    model: Any,
    plan: Any,
    seed: int,
    store: Any,
    train_groups: Sequence[np.ndarray],
    val_groups: Sequence[np.ndarray],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: ``{"config": {...}, "data": {...}}``.

    ``config`` holds the model name and configuration, the optimisation plan, the seed and the phases (compared
    entry by entry, so that a mismatch can be named); ``data`` holds a sha256 of the training and validation rows
    and of each store tensor, plus the entries of ``extra`` (e.g. the gene panel) hashed the same way.
    """
    from dataclasses import asdict, is_dataclass

    config = {
        "model": getattr(model, "name", type(model).__name__),
        "model_config": asdict(model.config) if is_dataclass(model.config) else model.config,
        "plan": asdict(plan) if is_dataclass(plan) else plan,
        "seed": int(seed),
        "phases": list(model.phases),
    }
    data: dict[str, str] = {}
    h = hashlib.sha256()
    for name, groups in (("train", train_groups), ("val", val_groups)):
        h.update(name.encode())
        for g in groups:
            _hash_tensor(h, torch.as_tensor(np.asarray(g, dtype=np.int64)))
    data["rows"] = h.hexdigest()
    for key in sorted(store.tensors):
        h = hashlib.sha256()
        _hash_tensor(h, store.tensors[key])
        data[f"store:{key}"] = h.hexdigest()
    for key, value in (extra or {}).items():
        data[key] = hashlib.sha256(json.dumps(_canonical(value), sort_keys=True, allow_nan=False).encode()).hexdigest()
    return {"config": _canonical(config), "data": data}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def mismatches(state: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What differs between a saved run's fingerprint and ``expected`` (empty: the run may be resumed)."""
    out = []
    saved, now = _flatten(state.get("config", {})), _flatten(expected["config"])
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            out.append(f"{key}: {saved.get(key, '<absent>')!r} in the run, {now.get(key, '<absent>')!r} now")
    saved_data, now_data = dict(state.get("data", {})), dict(expected["data"])
    for key in sorted(set(saved_data) | set(now_data)):
        if saved_data.get(key) != now_data.get(key):
            known = {"rows": "the training/validation spots differ", "genes": "the gene panel differs"}
            out.append(known.get(key, f"the data differ ({key.removeprefix('store:')!r} inputs)"))
    return out


def runs_of(root: str | os.PathLike, model: str) -> list[tuple[Path, dict[str, Any]]]:
    """The readable run folders of ``model`` directly under ``root``, most recent first."""
    root = Path(root)
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        path = child / STATE_FILE
        if path.is_file():
            try:
                state = read_state(child)
            except (OSError, ValueError):
                continue
            if state.get("config", {}).get("model") == model:
                found.append((str(state.get("created", "")), path.stat().st_mtime, child, state))
    found.sort(key=lambda c: (c[0], c[1]), reverse=True)
    return [(child, state) for _, _, child, state in found]


def check_has_runs(root: str | os.PathLike, model: str) -> None:
    """Refuse, before any work, a checkpoint folder without a run of ``model`` to resume."""
    if not runs_of(root, model):
        msg = (
            f"No {model!r} run to resume under {str(root)!r}. Pass the folder of an interrupted fit as "
            "`resume=`, or drop `resume` to start a new run."
        )
        raise FileNotFoundError(msg)


def find_run(root: str | os.PathLike, expected: Mapping[str, Any]) -> Path:
    """The most recent run folder under ``root`` whose fingerprint equals ``expected``.

    Raises
    ------
    FileNotFoundError
        ``root`` holds no run folder of this model.
    ValueError
        No run matches; the message names what differs for the most recent ones.
    """
    model = expected["config"]["model"]
    check_has_runs(root, model)
    candidates = runs_of(root, model)
    reasons = []
    for child, state in candidates:
        diff = mismatches(state, expected)
        if not diff:
            return child
        reasons.append(f"{child.name}: " + "; ".join(diff[:4]))
    msg = (
        f"None of the {len(candidates)} {model!r} run(s) under {str(root)!r} was started with these settings and "
        "data, so none can be resumed:\n  " + "\n  ".join(reasons[:5]) + "\nPass the same arguments and data as "
        "the interrupted fit, or drop `resume` to start a new run."
    )
    raise ValueError(msg)
