"""The HER2+ breast cancer legacy-ST sections C2–C6 (Andersson et al. 2021)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from .._validate import check_sections

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Section → file name of its full-resolution H&E image (``ST-imgs/C/{section}/``).
HER2ST_IMAGES = {
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}
#: Patient of the sections above.
HER2ST_PATIENT = "C"
#: Where the files are published (the ``data/`` folder of the public repository ``almaan/her2st``).
HER2ST_URL = "https://github.com/almaan/her2st/raw/HEAD/data"
#: Environment variable that points to a local copy of the data.
HER2ST_ENV = "STPRED_HER2ST"


def _files(section: str) -> dict[str, str]:
    """Paths of one section's files, relative to the data folder."""
    return {
        "counts": f"ST-cnts/{section}.tsv.gz",
        "spots": f"ST-spotfiles/{section}_selection.tsv",
        "image": f"ST-imgs/{HER2ST_PATIENT}/{section}/{HER2ST_IMAGES[section]}",
    }


def _find_image(root: Path, section: str) -> Path:
    """The section's JPEG: the known file name, else the only ``*.jpg`` in ``ST-imgs/C/{section}/``."""
    known = root / _files(section)["image"]
    if known.is_file():
        return known
    found = sorted((root / "ST-imgs" / HER2ST_PATIENT / section).glob("*.jpg"))
    if not found:
        msg = (
            f"No H&E image of section {section!r} under {str(root / 'ST-imgs' / HER2ST_PATIENT / section)!r}; "
            f"expected {HER2ST_IMAGES[section]!r} as in the repository almaan/her2st."
        )
        raise FileNotFoundError(msg)
    return found[0]


def _is_complete(root: Path, sections: Sequence[str]) -> bool:
    return all((root / f).is_file() for s in sections for k, f in _files(s).items() if k != "image") and all(
        any((root / "ST-imgs" / HER2ST_PATIENT / s).glob("*.jpg")) for s in sections
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("STPRED_CACHE", Path.home() / ".cache" / "stpred")) / "her2st"


def _download(root: Path, sections: Sequence[str], *, base_url: str = HER2ST_URL) -> None:
    """Download the missing files of ``sections`` from ``base_url`` into ``root`` (each file written atomically)."""
    for section in sections:
        for relative in _files(section).values():
            target = root / relative
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            url = f"{base_url}/{relative}"
            logger.info("downloading %s", url)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            try:
                with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(response, out)
                Path(tmp).replace(target)
            except (urllib.error.URLError, OSError) as err:
                Path(tmp).unlink(missing_ok=True)
                msg = (
                    f"Could not download {url} ({err}). Are you offline? Download the folders data/ST-cnts, "
                    "data/ST-spotfiles and data/ST-imgs/C of https://github.com/almaan/her2st yourself and pass "
                    f"`path=` (or set {HER2ST_ENV})."
                )
                raise ConnectionError(msg) from err


def _resolve(path: str | os.PathLike | None, sections: Sequence[str]) -> Path:
    """Folder with the data: ``path``, else ``$STPRED_HER2ST``, else ``<repo>/../shared/data/her2st``, else download."""
    if path is not None or os.environ.get(HER2ST_ENV):
        root = Path(path if path is not None else os.environ[HER2ST_ENV])
        where = "`path`" if path is not None else f"${HER2ST_ENV}"
        if not root.is_dir():
            msg = f"The HER2 data folder {str(root)!r} (from {where}) does not exist."
            raise FileNotFoundError(msg)
        missing = [f for s in sections for k, f in _files(s).items() if k != "image" and not (root / f).is_file()]
        if missing:
            msg = (
                f"The HER2 data folder {str(root)!r} (from {where}) lacks {missing[:3]}; it must hold ST-cnts/, "
                "ST-spotfiles/ and ST-imgs/C/ as in the repository almaan/her2st (data/)."
            )
            raise FileNotFoundError(msg)
        return root
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "her2st"
    if _is_complete(shared, sections):
        return shared
    cache = _cache_dir()
    if not _is_complete(cache, sections):
        _download(cache, sections)
    return cache


def her2st(path: str | os.PathLike | None = None, *, sections: Sequence[str] | None = None) -> SpatialData:
    """Load the HER2+ breast cancer sections C2–C6 of patient C (legacy ST, Andersson et al. 2021).

    Five consecutive serial sections of one tumour, about 180 spots each under tissue, 15,000+ genes, spots of
    100 µm on a 200 µm grid, full-resolution H&E images of about 10,000 pixels per side (about 0.69 µm/px). This is
    part of the "HER2" data set of HiFusion and MMAP; cite Andersson et al., Nature Communications 12, 6012 (2021).

    Parameters
    ----------
    path
        Folder laid out as the ``data/`` folder of the repository ``almaan/her2st``: ``ST-cnts/C2.tsv.gz``,
        ``ST-spotfiles/C2_selection.tsv``, ``ST-imgs/C/C2/*.jpg``, and so on. ``None`` uses the environment variable
        ``STPRED_HER2ST``, else ``../shared/data/her2st`` next to the stpred repository, else the files are
        downloaded from GitHub into ``~/.cache/stpred/her2st`` (``$STPRED_CACHE/her2st``) — this needs network access.
    sections
        Sections to load, among ``"C2"``, ..., ``"C6"``; ``None`` loads all five. Each full-resolution image takes
        a few seconds to decode and about 280 MB of memory.

    Returns
    -------
    SpatialData in the stpred contract (see :func:`stpred.io.read_legacy_st`): images ``"C2_hne"``, ...,
    shapes ``"C2_spots"``, ..., the raw-count table ``"table"`` with ``obs["patient"] == "C"`` and, as in
    :func:`stpred.io.concat`, ``var["present_C2"]``, ... for the genes each section measured.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.her2st(sections=["C2", "C3"])  # doctest: +SKIP
    """
    from ..io._concat import concat
    from ..io._legacy_st import read_legacy_st

    chosen = list(dict.fromkeys(check_sections(sections, list(HER2ST_IMAGES))))
    root = _resolve(path, chosen)
    parts = []
    for section in chosen:
        files = _files(section)
        logger.info("reading HER2 section %s from %s", section, root)
        parts.append(
            read_legacy_st(
                root / files["counts"],
                root / files["spots"],
                _find_image(root, section),
                section=section,
                patient=HER2ST_PATIENT,
            )
        )
    sdata = concat(parts)
    sdata.tables["table"].uns["stpred"]["dataset"] = {"name": "her2st", "source": "almaan/her2st"}
    return sdata
