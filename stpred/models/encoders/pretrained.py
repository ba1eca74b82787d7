"""Published image encoders by name: architecture, weights source, expected checksum and preprocessing.

Each entry of :data:`PRETRAINED` says which architecture of :mod:`~stpred.models.encoders.vit` or
:mod:`~stpred.models.encoders.resnet` the published checkpoint loads into (strictly), where the checkpoint comes from,
the channel statistics the encoder was trained with, and the embedding width. :func:`fetch_weights` finds the file:

1. ``weights=`` given by the caller (a local file, or ``"hf-hub:<owner>/<repo>[/<file>]"``);
2. a local copy at ``$STPRED_WEIGHTS_DIR/<name>/<file>`` (default directory ``~/.cache/stpred/weights``);
3. a download: from the Hugging Face hub with the optional package ``huggingface_hub`` (gated repositories need an
   accepted licence and a token: ``huggingface-cli login`` or ``HF_TOKEN``), or, for torchvision's ResNet-50, from
   ``download.pytorch.org`` into the directory of step 2.

Nothing is downloaded unless the first two steps find no file.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..._constants import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = ["PRETRAINED", "PretrainedEncoder", "check_sha256", "fetch_weights", "hub_download", "weights_dir"]

#: Environment variable naming the directory of local weight files (``<dir>/<name>/<file>``).
WEIGHTS_DIR_ENV = "STPRED_WEIGHTS_DIR"
_DEFAULT_DIR = "~/.cache/stpred/weights"
#: Prefix of hub references accepted as ``weights=``.
HUB_PREFIX = "hf-hub:"
_HUB_DEFAULT_FILE = "pytorch_model.bin"

#: OpenAI CLIP statistics, which CONCH's preprocessing uses.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PretrainedEncoder:
    """A published encoder: how to build it, where its weights are and how it was trained.

    Attributes
    ----------
    name
        Canonical name (``stpred.pp.embed(encoder=name)``).
    family
        ``"vit"`` or ``"resnet"``.
    arch
        Architecture key: of :data:`~stpred.models.encoders.vit.VIT_ARCHS` (``"vit"``) or a constructor of
        :mod:`~stpred.models.encoders.resnet` (``"resnet"``).
    dim
        Embedding width of the module's ``forward`` at the published size.
    img_size
        Input side the encoder is run at (crops are resized to it), ``None`` for a CNN that takes any size.
    mean, std
        Channel statistics (of images scaled to [0, 1]) of the published preprocessing.
    repo_id, filename
        Hugging Face hub repository and file of the checkpoint (``repo_id`` ``None`` when it is not on the hub).
    url
        Direct download address when the checkpoint is not on the hub (torchvision).
    expected_sha256
        sha256 of the published file (a full hex digest, or the prefix the publisher states, e.g. torchvision's
        file-name hash); ``None`` where it is not known. A file that does not match warns.
    gated
        The hub repository asks users to accept its terms before downloading.
    licence
        Licence of the weights, as the model page states it.
    mpp
        Resolution (µm/px) of the training tiles where stated, else ``None``.
    reference
        The paper to cite.
    """

    name: str
    family: Literal["vit", "resnet"]
    arch: str
    dim: int
    img_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    repo_id: str | None
    filename: str
    url: str | None
    expected_sha256: str | None
    gated: bool
    licence: str
    mpp: float | None
    reference: str

    @property
    def local_path(self) -> Path:
        """Where :func:`fetch_weights` looks for a local copy: ``weights_dir() / name / filename``."""
        return weights_dir() / self.name / self.filename

    @property
    def source(self) -> str:
        """The download source: ``"hf-hub:<repo>/<file>"`` or the URL."""
        return f"{HUB_PREFIX}{self.repo_id}/{self.filename}" if self.repo_id else str(self.url)


#: Canonical name → published encoder. Architectures as on the model cards (timm ``model_args``).
PRETRAINED: dict[str, PretrainedEncoder] = {
    spec.name: spec
    for spec in (
        PretrainedEncoder(
            name="uni",
            family="vit",
            arch="uni",
            dim=1024,
            img_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            repo_id="MahmoodLab/UNI",
            filename="pytorch_model.bin",
            url=None,
            expected_sha256=None,
            gated=True,
            licence="CC-BY-NC-ND-4.0",
            mpp=0.5,
            reference="Chen et al. 2024, Nat. Med. 30:850 (UNI)",
        ),
        PretrainedEncoder(
            name="uni2_h",
            family="vit",
            arch="uni2_h",
            dim=1536,
            img_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            repo_id="MahmoodLab/UNI2-h",
            filename="pytorch_model.bin",
            url=None,
            expected_sha256=None,
            gated=True,
            licence="CC-BY-NC-ND-4.0",
            mpp=0.5,
            reference="Chen et al. 2024, Nat. Med. 30:850 (UNI; UNI2-h model card)",
        ),
        PretrainedEncoder(
            name="h_optimus_0",
            family="vit",
            arch="h_optimus_0",
            dim=1536,
            img_size=224,
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            repo_id="bioptimus/H-optimus-0",
            filename="pytorch_model.bin",
            url=None,
            expected_sha256=None,
            gated=False,
            licence="Apache-2.0",
            mpp=0.5,
            reference="Saillard et al. 2024, H-optimus-0 (Bioptimus)",
        ),
        PretrainedEncoder(
            name="virchow",
            family="vit",
            arch="virchow",
            dim=2560,
            img_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            repo_id="paige-ai/Virchow",
            filename="pytorch_model.bin",
            url=None,
            expected_sha256=None,
            gated=True,
            licence="Apache-2.0 with additional terms of use",
            mpp=0.5,
            reference="Vorontsov et al. 2024, Nat. Med. 30:2924 (Virchow)",
        ),
        PretrainedEncoder(
            name="conch",
            family="vit",
            arch="conch",
            dim=768,
            img_size=448,
            mean=_OPENAI_MEAN,
            std=_OPENAI_STD,
            repo_id="MahmoodLab/CONCH",
            filename="pytorch_model.bin",
            url=None,
            expected_sha256=None,
            gated=True,
            licence="CC-BY-NC-ND-4.0",
            mpp=None,
            reference="Lu et al. 2024, Nat. Med. 30:863 (CONCH)",
        ),
        PretrainedEncoder(
            name="resnet50_imagenet",
            family="resnet",
            arch="resnet50",
            dim=2048,
            img_size=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            repo_id=None,
            filename="resnet50-0676ba61.pth",
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
            # torchvision names its files by the first 8 hex digits of their sha256 and checks them on download
            expected_sha256="0676ba61",
            gated=False,
            licence="BSD-3-Clause (torchvision)",
            mpp=None,
            reference="He et al. 2016, CVPR (ResNet); torchvision IMAGENET1K_V1 weights",
        ),
    )
}


def weights_dir() -> Path:
    """Directory of local weight files: ``$STPRED_WEIGHTS_DIR``, else ``~/.cache/stpred/weights``."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or _DEFAULT_DIR).expanduser()


def _local_hint(spec: PretrainedEncoder | None) -> str:
    if spec is None:
        return "Download the file on a machine with internet access and pass its local path as `weights=`."
    return (
        f"Or download {spec.filename!r} from {spec.source} on a machine with internet access and either pass its "
        f"path as `weights=` or put it at {str(spec.local_path)!r} (directory set by ${WEIGHTS_DIR_ENV})."
    )


def hub_download(ref: str, *, spec: PretrainedEncoder | None = None) -> Path:
    """Download ``"hf-hub:<owner>/<repo>[/<file>]"`` with ``huggingface_hub`` (default file ``pytorch_model.bin``).

    Parameters
    ----------
    ref
        The hub reference.
    spec
        The encoder it is for (names its local-file alternative in errors).

    Returns
    -------
    The local path of the downloaded (or already cached) file.

    Raises
    ------
    ValueError
        ``ref`` is not of the form ``hf-hub:<owner>/<repo>[/<file>]``.
    ImportError
        ``huggingface_hub`` is not installed (the message names the local-file alternative).
    OSError
        The download failed: offline, no access to a gated repository, or no such file.
    """
    import importlib.util

    parts = [p for p in ref.removeprefix(HUB_PREFIX).split("/") if p]
    if not ref.startswith(HUB_PREFIX) or len(parts) < 2:
        msg = (
            f"Expected a hub reference 'hf-hub:<owner>/<repo>[/<file>]', found {ref!r} (e.g. 'hf-hub:MahmoodLab/UNI')."
        )
        raise ValueError(msg)
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or _HUB_DEFAULT_FILE
    if importlib.util.find_spec("huggingface_hub") is None:
        msg = (
            f"Downloading {filename!r} from the hub repository {repo_id!r} needs the optional package "
            f"`huggingface_hub` (`pip install huggingface_hub`) and internet access. {_local_hint(spec)}"
        )
        raise ImportError(msg)
    from huggingface_hub import hf_hub_download

    logger.info("Fetching %s from the Hugging Face hub repository %s.", filename, repo_id)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as err:  # huggingface_hub raises many types (offline, gated, 404): all mean "no file"
        text = f"{type(err).__name__}: {str(err)[:300]}"
        gated = "gated" in text.lower() or "401" in text or "403" in text or (spec is not None and spec.gated)
        access = (
            f" The repository is gated: accept its terms at https://huggingface.co/{repo_id} and log in "
            "(`huggingface-cli login`, or set HF_TOKEN)."
            if gated
            else ""
        )
        msg = f"Could not download {filename!r} from the hub repository {repo_id!r} ({text}).{access} {_local_hint(spec)}"
        raise OSError(msg) from err


def _download_url(url: str, dst: Path, *, hash_prefix: str | None) -> None:
    """Download ``url`` to ``dst`` with torch's downloader (checks ``hash_prefix`` of the sha256 when given)."""
    from torch.hub import download_url_to_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=False)


def fetch_weights(name: str, *, weights: str | os.PathLike | None = None) -> Path:
    """Local path of the weights of the published encoder ``name``, downloading them only when nothing local exists.

    Parameters
    ----------
    name
        A key of :data:`PRETRAINED`.
    weights
        A local file (used as it is), ``"hf-hub:<owner>/<repo>[/<file>]"``, or ``None``: the local copy at
        :attr:`PretrainedEncoder.local_path` if present, else the published source.

    Returns
    -------
    Path of an existing file (not yet checked against the architecture).

    Raises
    ------
    KeyError
        Unknown ``name``.
    FileNotFoundError
        ``weights`` names a file that does not exist.
    ImportError
        A hub download is needed but ``huggingface_hub`` is not installed.
    OSError
        The download failed (offline, gated repository without access); the message names the local-file
        alternative.

    Examples
    --------
    >>> from stpred.models.encoders.pretrained import PRETRAINED
    >>> PRETRAINED["virchow"].dim, PRETRAINED["uni2_h"].repo_id
    (2560, 'MahmoodLab/UNI2-h')
    """
    if name not in PRETRAINED:
        msg = f"Unknown pretrained encoder {name!r}; expected one of {sorted(PRETRAINED)}."
        raise KeyError(msg)
    spec = PRETRAINED[name]
    if isinstance(weights, str) and weights.startswith(HUB_PREFIX):
        return hub_download(weights, spec=spec)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            msg = f"No weights file at {str(path)!r}. Pass the path of a local state dict saved with `torch.save`."
            raise FileNotFoundError(msg)
        return path
    local = spec.local_path
    if local.is_file():
        logger.info("Using the local copy %s of %s.", local, name)
        return local
    if spec.repo_id is not None:
        return hub_download(f"{HUB_PREFIX}{spec.repo_id}/{spec.filename}", spec=spec)
    logger.info("Fetching %s from %s into %s.", name, spec.url, local)
    try:
        _download_url(str(spec.url), local, hash_prefix=spec.expected_sha256)
    except Exception as err:  # urllib/OS errors offline, RuntimeError on a hash mismatch
        msg = f"Could not download {spec.url} ({type(err).__name__}: {str(err)[:300]}). {_local_hint(spec)}"
        raise OSError(msg) from err
    return local


def check_sha256(name: str, actual: str) -> bool:
    """Compare a file's sha256 with the published one of encoder ``name``; warn when they differ.

    Parameters
    ----------
    name
        A key of :data:`PRETRAINED`.
    actual
        Hex sha256 of the file that was loaded.

    Returns
    -------
    ``True`` when the hashes agree (or a published prefix matches), ``False`` when they differ (after a
    :class:`UserWarning`); ``True`` when no hash is known.
    """
    expected = PRETRAINED[name].expected_sha256
    if expected is None or actual.lower().startswith(expected.lower()):
        return True
    warnings.warn(
        f"The weights loaded for {name!r} have sha256 {actual[:16]}…, not the published {expected}…; they are not "
        "the published checkpoint (a fine-tuned or corrupted file?). The result is recorded with the actual hash.",
        UserWarning,
        stacklevel=3,
    )
    return False
