"""Name → model class registry (``@register_model``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ._base import StpredModel

M = TypeVar("M", bound=type[StpredModel])

_MODELS: dict[str, type[StpredModel]] = {}
#: Built-in models, imported on first use so that ``import stpred.models`` stays light.
_BUILTIN = {
    "hifusion": "stpred.models.hifusion",
    "hist": "stpred.models.hist",
    "mmap": "stpred.models.mmap",
    "mean": "stpred.models.baselines",
    "ridge": "stpred.models.baselines",
}


def _import_builtin(name: str | None = None) -> None:
    import importlib

    for key, module in _BUILTIN.items():
        if (name is None or key == name) and key not in _MODELS:
            importlib.import_module(module)


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator that files a model under ``name`` (refuses a name already taken).

    Parameters
    ----------
    name
        Registry name (case-insensitive); also set as the class attribute ``name``.

    Returns
    -------
    The decorator. It refuses classes that do not subclass :class:`~stpred.models.StpredModel`.

    Examples
    --------
    >>> @stpred.models.register_model("my_model")
    ... class MyModel(stpred.models.StpredModel): ...
    """

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, StpredModel)):
            msg = (
                f"Cannot register {cls!r} as {name!r}: models must subclass `stpred.models.StpredModel` "
                "(see its docstring for what a model declares)."
            )
            raise TypeError(msg)
        key = name.lower()
        if key in _MODELS and _MODELS[key] is not cls:
            msg = f"A model named {key!r} is already registered ({_MODELS[key].__name__})."
            raise ValueError(msg)
        _MODELS[key] = cls
        cls.name = key
        return cls

    return deco


def unregister_model(name: str) -> None:
    """Remove the model registered under ``name`` (for tests and interactive sessions).

    Parameters
    ----------
    name
        A registered name (case-insensitive).
    """
    key = name.lower()
    if key not in _MODELS:
        msg = f"No model named {key!r} is registered; registered models: {sorted(_MODELS)}."
        raise ValueError(msg)
    del _MODELS[key]


def get_model(name: str) -> type[StpredModel]:
    """The model class registered under ``name``.

    Parameters
    ----------
    name
        A registered name (case-insensitive), e.g. ``"hifusion"``, ``"hist"``, ``"mmap"``, or the baselines
        ``"mean"`` and ``"ridge"``.

    Returns
    -------
    The model class. Unknown names raise a :class:`ValueError` listing the registered ones.
    """
    if not isinstance(name, str):
        msg = f"Expected a model name (str), found {type(name).__name__}."
        raise TypeError(msg)
    _import_builtin(name.lower())
    try:
        return _MODELS[name.lower()]
    except KeyError:
        _import_builtin()
        msg = f"Unknown model {name!r}. Registered models: {sorted(_MODELS)}."
        raise ValueError(msg) from None


def list_models() -> list[str]:
    """Names of all registered models."""
    _import_builtin()
    return sorted(_MODELS)
