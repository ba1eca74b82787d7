"""The contract between an stpred model and the engine: :class:`StpredModel`, :class:`LossOutput`, :class:`TrainDefaults`.

A new model is one subclass of :class:`StpredModel` and one :func:`~stpred.models.register_model` decorator;
:func:`stpred.tl.fit`, :func:`stpred.tl.predict`, :meth:`~stpred.tl.Predictor.save` and :func:`stpred.tl.load`
then work unchanged. The engine (:mod:`stpred.train`) and the tools (:mod:`stpred.tl`) only use what is declared
here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

from .._constants import BatchKeys

if TYPE_CHECKING:
    from typing import Self

    import numpy as np

#: Batch keys a model may list in :attr:`StpredModel.inputs`.
INPUT_KEYS = (BatchKeys.SPOT, BatchKeys.CONTEXT, BatchKeys.EMBEDDING, BatchKeys.COORDS, BatchKeys.SLIDE)
#: Data-derived constructor arguments a model may list in :attr:`StpredModel.data_sizes`.
DATA_SIZES = ("n_genes", "in_dim")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class RandomWeightsWarning(UserWarning):
    """A model was built with randomly initialised weights where its paper uses pretrained ones.

    Loading a saved predictor silences it: the weights come from the file.
    """


@dataclass(frozen=True)
class TrainDefaults:
    """Optimisation defaults a model declares (``config.train``); :func:`stpred.tl.fit` overrides them.

    ``max_epochs``, ``batch_size`` and ``lr`` are overridden by the arguments of the same name of
    :func:`stpred.tl.fit`, every other field by its ``plan_kwargs``.

    Attributes
    ----------
    lr
        Learning rate (finite, positive).
    weight_decay
        Weight decay of the optimiser (finite, non-negative).
    optimizer
        ``"adam"`` or ``"adamw"``.
    scheduler
        ``"cosine"`` (per-epoch cosine annealing to ``min_lr``) or ``"none"``.
    min_lr
        Final learning rate of the cosine schedule.
    max_epochs
        Training epochs per phase (positive int).
    batch_size
        Spots per batch for ``"spots"`` batching (positive int; ignored by ``"slide"`` batching).
    early_stopping_patience
        Stop after this many epochs without a better validation MSE (``None``: train all epochs).
    batch_per_section
        Draw every training batch from a single section (matters for BatchNorm); ``False`` mixes sections.
        ``"slide"`` batching is always per section.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: Literal["adam", "adamw"] = "adam"
    scheduler: Literal["cosine", "none"] = "cosine"
    min_lr: float = 1e-6
    max_epochs: int = 50
    batch_size: int = 32
    early_stopping_patience: int | None = None
    batch_per_section: bool = False

    def __post_init__(self) -> None:
        for name in ("max_epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                msg = f"Expected `{name}` to be a positive int, found {value!r}."
                raise ValueError(msg)
            object.__setattr__(self, name, int(value))
        patience = self.early_stopping_patience
        if patience is not None:
            if not _is_int(patience) or patience <= 0:
                msg = f"Expected `early_stopping_patience` to be a positive int or None, found {patience!r}."
                raise ValueError(msg)
            object.__setattr__(self, "early_stopping_patience", int(patience))
        for name, strict in (("lr", True), ("weight_decay", False), ("min_lr", False)):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or (value <= 0 if strict else value < 0):
                kind = "positive" if strict else "non-negative"
                msg = f"Expected `{name}` to be a finite {kind} number, found {value!r}."
                raise ValueError(msg)
            object.__setattr__(self, name, float(value))
        for name, allowed in (("optimizer", ("adam", "adamw")), ("scheduler", ("cosine", "none"))):
            if getattr(self, name) not in allowed:
                msg = f"Unknown {name} {getattr(self, name)!r}; expected one of {list(allowed)}."
                raise ValueError(msg)
        if not isinstance(self.batch_per_section, bool):
            msg = f"Expected `batch_per_section` to be True or False, found {self.batch_per_section!r}."
            raise ValueError(msg)


@dataclass(frozen=True)
class LossOutput:
    """What :meth:`StpredModel.loss` returns.

    Attributes
    ----------
    loss
        Scalar that is minimised.
    mse
        Mean squared error of the final prediction ``out["pred"]`` (logged as ``train_mse`` / ``val_mse``; the
        best epoch is chosen on ``val_mse``, comparable across models).
    extra
        Other scalars to log (``train_<name>``), e.g. auxiliary loss terms.
    """

    loss: Tensor
    mse: Tensor
    extra: Mapping[str, Tensor] = field(default_factory=dict)

    def logged(self) -> dict[str, Tensor]:
        """Detached scalars to log besides ``loss``: ``mse`` and every entry of ``extra``."""
        return {"mse": self.mse.detach(), **{k: v.detach() for k, v in self.extra.items()}}


class StpredModel(nn.Module):
    """Base class of every stpred model: what the engine may rely on, with no-op defaults for the hooks.

    A subclass declares, at class level:

    ``inputs``
        Batch keys the engine supplies besides ``"target"``: any of ``"spot"`` (uint8 crops ``(B, 3, S, S)``),
        ``"context"`` (uint8 crops ``(B, 3, C, C)``), ``"embedding"`` (``(B, D)``), ``"coords"`` (lattice
        indices ``(B, 2)``) and ``"slide"`` (section index ``(B,)``), e.g. ``("spot", "context")``.
    ``batching``
        ``"spots"`` (mini-batches of spots) or ``"slide"`` (one whole section per step).
    ``data_sizes``
        Constructor arguments derived from the data: ``"n_genes"`` (size of the gene panel) and ``"in_dim"``
        (width of the embedding, for models that read ``"embedding"``). The constructor takes them by name,
        then the model options as keywords, and ``config`` holds a field of the same name for each.
    ``trainable``
        ``True``: trained by gradient descent (Lightning). ``False``: fitted in closed form by
        :meth:`fit_closed_form`, through the same fit / predict / save / load path.

    An instance has ``config``, a frozen dataclass with every option and a :class:`TrainDefaults` under
    ``config.train``, and implements ``forward(batch) -> dict`` whose ``"pred"`` entry is the ``(B, n_genes)``
    normalised expression. ``name`` is set by :func:`~stpred.models.register_model`.

    Examples
    --------
    >>> @register_model("mean_cnn")
    ... class MeanCNN(StpredModel):
    ...     inputs = ("spot",)
    ...     def __init__(self, n_genes: int, **options):
    ...         super().__init__()
    ...         self.config = MeanCNNConfig(n_genes, **options)
    ...         self.head = nn.Linear(3, n_genes)
    ...     def forward(self, batch):
    ...         return {"pred": self.head(batch["spot"].float().mean((2, 3)) / 255)}
    """

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    batching: ClassVar[Literal["spots", "slide"]] = "spots"
    data_sizes: ClassVar[tuple[str, ...]] = ("n_genes",)
    trainable: ClassVar[bool] = True
    #: Training phases, run in order (each one: :meth:`set_phase`, :meth:`prepare_slides`, then training).
    phases: tuple[int, ...] = (1,)
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = [k for k in cls.inputs if k not in INPUT_KEYS]
        if unknown:
            msg = f"{cls.__name__}.inputs lists unknown batch keys {unknown}; expected a subset of {list(INPUT_KEYS)}."
            raise TypeError(msg)
        if cls.batching not in ("spots", "slide"):
            msg = f"{cls.__name__}.batching must be 'spots' or 'slide', found {cls.batching!r}."
            raise TypeError(msg)
        bad = [k for k in cls.data_sizes if k not in DATA_SIZES]
        if bad or "n_genes" not in cls.data_sizes:
            msg = f"{cls.__name__}.data_sizes must include 'n_genes' and only {list(DATA_SIZES)}; found {cls.data_sizes}."
            raise TypeError(msg)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sizes(cls, sizes: Mapping[str, int], **options: Any) -> Self:
        """Build the model from data-derived sizes (``sizes`` must hold every name in :attr:`data_sizes`).

        Parameters
        ----------
        sizes
            ``{"n_genes": ..., "in_dim": ...}``; entries the model does not declare are ignored.
        **options
            Model options (fields of the model's config dataclass).
        """
        missing = [k for k in cls.data_sizes if k not in sizes]
        if missing:
            msg = f"{cls.__name__} needs the data sizes {list(cls.data_sizes)}; missing {missing}."
            raise ValueError(msg)
        return cls(**{k: int(sizes[k]) for k in cls.data_sizes}, **options)

    def sizes(self) -> dict[str, int]:
        """The data-derived sizes this model was built with (one per name in :attr:`data_sizes`)."""
        return {k: int(getattr(self.config, k)) for k in self.data_sizes}

    @property
    def crop_sizes(self) -> tuple[int | None, int | None]:
        """Side in pixels of the spot and context crops the model reads (``None``: any size, or not read)."""
        return None, None

    # ------------------------------------------------------------------ training
    def loss(self, out: Mapping[str, Any], batch: Mapping[str, Tensor]) -> LossOutput:
        """Training loss of ``out = self(batch)``; the default is the MSE of ``out["pred"]`` to ``batch["target"]``.

        Parameters
        ----------
        out
            Output of :meth:`forward`.
        batch
            The batch, with ``"target"``: ``(B, n_genes)`` normalised expression.
        """
        from torch.nn import functional as F

        if BatchKeys.TARGET not in batch:
            msg = f"{type(self).__name__}'s loss needs batch[{BatchKeys.TARGET!r}]; found the keys {sorted(batch)}."
            raise KeyError(msg)
        mse = F.mse_loss(out["pred"].float(), batch[BatchKeys.TARGET].float())
        return LossOutput(loss=mse, mse=mse.detach())

    def augment(self, batch: dict[str, Tensor], progress: float) -> dict[str, Tensor]:
        """Training-time augmentation on the device (default: none); ``progress`` is the fraction of training done."""
        return batch

    def init_head_bias(self, mean: Tensor) -> None:
        """Start the output at the mean training target ``mean`` ``(n_genes,)`` before training (default: no-op)."""

    def set_phase(self, phase: int) -> None:
        """Switch to training phase ``phase`` (one of :attr:`phases`; default: no-op)."""

    def prepare_slides(self, store: Any, groups: Sequence[np.ndarray]) -> None:
        """Per-slide preparation before each phase and before prediction (default: no-op).

        Parameters
        ----------
        store
            The :class:`~stpred.train.TensorStore` of the fit or prediction (it may be extended in place).
        groups
            Row indices of each section taking part.
        """

    def fit_closed_form(
        self, store: Any, train_groups: Sequence[np.ndarray], val_groups: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """Fit the parameters without gradient descent (models with ``trainable = False``).

        Parameters
        ----------
        store
            :class:`~stpred.train.TensorStore` with the model's inputs and ``"target"`` for every row.
        train_groups, val_groups
            Row indices of the training and validation spots, one array per section.

        Returns
        -------
        Scalars recorded as the single row of the fit's history (e.g. ``train_mse``, ``val_mse``).
        """
        msg = f"{type(self).__name__} declares `trainable = False` and must implement `fit_closed_form`."
        raise NotImplementedError(msg)

    # ------------------------------------------------------------------ uncertainty and out-of-distribution
    def dropout_modules(self) -> list[nn.Module]:
        """Modules whose dropout is active in training mode, each with a positive rate.

        MC-dropout (``stpred.tl.predict(..., uncertainty="mc_dropout")``) switches exactly these modules (not
        their children) to training mode at inference; everything else, BatchNorm included, stays in eval mode.
        The default finds every ``nn.Dropout*`` with ``p > 0`` and every ``nn.MultiheadAttention`` with
        ``dropout > 0``; a model whose dropout lives elsewhere (e.g. a functional dropout gated by
        ``self.training``) adds those modules. An empty list means the model cannot give MC-dropout samples.
        """
        found: list[nn.Module] = []
        for module in self.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                found.append(module)
            elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
                found.append(module)
        return found

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Image representation ``(B, D)`` of each spot, before the output head (for out-of-distribution scores).

        The default raises: a model opts in by returning the representation its head reads. Called in eval mode
        with the same batches as :meth:`forward`.
        """
        msg = (
            f"{type(self).__name__} does not implement `features(batch)`, so stpred cannot score how far new spots "
            "lie from the training spots. Pass `ood=False` to `stpred.tl.predict`, or implement `features` to "
            "return the representation before the model's head."
        )
        raise NotImplementedError(msg)
