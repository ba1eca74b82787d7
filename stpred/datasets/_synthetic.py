"""A small, seeded, H&E-like synthetic tissue whose expression follows its morphology."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._validate import check_positive

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Ground-truth programme of each gene, cycled over the genes (``var["programme"]``).
_PROGRAMMES = ("tumour", "stroma", "immune", "tumour", "stroma", "immune", "mixed", "noise", "constant", "noise")
#: Morphological features measured per spot, in this order (``obsm["morphology"]``).
_FEATURES = ("tumour_nuclei", "fibres", "immune_nuclei", "tissue")
#: Typical upper values of the features; genes respond to ``feature / scale``.
_FEATURE_SCALE = np.array([0.3, 0.3, 0.25, 1.0])

# RGB colours of the stains (uint8 scale)
_WHITE = np.array([244.0, 241.0, 245.0], dtype=np.float32)
_EOSIN = np.array([238.0, 170.0, 205.0], dtype=np.float32)
_FIBRE = np.array([212.0, 105.0, 160.0], dtype=np.float32)
_HAEMATOXYLIN = np.array([92.0, 52.0, 140.0], dtype=np.float32)
_DARK_HAEMATOXYLIN = np.array([55.0, 30.0, 105.0], dtype=np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standardised Gaussian random field (float32, unit variance) with correlation length ``sigma``."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-8)


def _upsample(coarse: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of the last two axes by ``factor``, cropped to ``shape``."""
    return np.repeat(np.repeat(coarse, factor, axis=-2), factor, axis=-1)[..., : shape[0], : shape[1]]


def _nuclei(
    rng: np.random.Generator, density: np.ndarray, factor: int, shape: tuple[int, int], *, rate: float, radius: float
) -> np.ndarray:
    """Soft mask (float32 in [0, 1]) of round nuclei drawn with a spatially varying density.

    Centres follow an inhomogeneous Poisson process (``rate`` nuclei per 1000 px² where ``density`` is 1, thinned by
    the coarse ``density`` map); each centre is splatted with a Gaussian and thresholded at ``radius``.
    """
    from scipy import ndimage

    h, w = shape
    n = rng.poisson(rate * h * w / 1000.0)
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    keep = rng.random(n) < density[ys // factor, xs // factor]
    ys, xs = ys[keep], xs[keep]
    size = rng.uniform(0.75, 1.35, len(ys))  # nucleus-to-nucleus size variation
    impulses = np.bincount(ys * w + xs, weights=size, minlength=h * w).astype(np.float32).reshape(h, w)
    sigma = radius / 1.45  # exp(-r²/2σ²) = 0.35 at the nucleus border
    field = ndimage.gaussian_filter(impulses, sigma, mode="constant") * (2.0 * np.pi * sigma**2)
    return np.clip((field - 0.35) * 4.0, 0.0, 1.0)


def _fibres(rng: np.random.Generator, shape: tuple[int, int], angle: np.ndarray, factor: int) -> np.ndarray:
    """Fibre-like streaks (float32 in [0, 1]): anisotropic noise in two orientations blended by ``angle`` (coarse)."""
    from scipy import ndimage

    h2, w2 = (shape[0] + 1) // 2, (shape[1] + 1) // 2  # half resolution, then upsampled
    noise = rng.standard_normal((h2, w2), dtype=np.float32)
    horizontal = ndimage.gaussian_filter(noise, (0.7, 7.0))
    vertical = ndimage.gaussian_filter(noise, (7.0, 0.7))
    mix = _upsample(angle, factor // 2, (h2, w2))
    streaks = mix * horizontal + (1.0 - mix) * vertical
    streaks /= streaks.std() + 1e-8
    streaks = np.clip((streaks - 0.2) * 1.1, 0.0, 1.0)
    return _upsample(streaks, 2, shape)


def _section(
    rng: np.random.Generator, *, grid: int, pitch: int
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Render one section; return the image ``(3, H, W)`` uint8, the per-spot features and the spot tissue fraction."""
    size = grid * pitch
    shape = (size, size)
    factor = 8  # resolution of the region maps
    coarse = (size // factor, size // factor)

    # smooth region maps: tissue outline and three competing morphologies
    yy, xx = np.mgrid[0 : coarse[0], 0 : coarse[1]].astype(np.float32)
    radial = np.hypot((yy / coarse[0] - 0.5) / 0.5, (xx / coarse[1] - 0.5) / 0.5)
    outline = 2.0 - 1.7 * radial**2 + 0.5 * _smooth_field(rng, coarse, size / factor / 8)
    tissue = 1.0 / (1.0 + np.exp(-8.0 * outline))
    scores = np.stack([_smooth_field(rng, coarse, pitch * 2.2 / factor) for _ in range(3)])
    member = np.exp(3.5 * scores)
    member /= member.sum(axis=0, keepdims=True)
    tumour, stroma, immune = member * tissue
    angle = 1.0 / (1.0 + np.exp(-3.0 * _smooth_field(rng, coarse, pitch * 1.5 / factor)))

    # pixels
    tissue_px = _upsample(tissue, factor, shape)
    fibre = _fibres(rng, shape, angle, factor) * (0.1 + 0.9 * _upsample(stroma, factor, shape))
    big = _nuclei(rng, np.clip(tumour * 1.3, 0, 1), factor, shape, rate=2.2, radius=6.0)
    small = _nuclei(rng, np.clip(immune * 1.3, 0, 1), factor, shape, rate=10.0, radius=2.8)
    sparse_nuclei = _nuclei(rng, np.clip(stroma * 0.5 + 0.1, 0, 1) * tissue, factor, shape, rate=1.0, radius=3.5)
    nuclei = np.maximum(big, sparse_nuclei)

    stain = rng.normal(1.0, 0.03, size=3).astype(np.float32)  # section-level stain variation
    rgb = _EOSIN[:, None, None] * (1.0 - fibre) + _FIBRE[:, None, None] * fibre
    rgb = _WHITE[:, None, None] * (1.0 - tissue_px) + rgb * tissue_px
    rgb = rgb * (1.0 - nuclei) + _HAEMATOXYLIN[:, None, None] * nuclei
    rgb = rgb * (1.0 - small) + _DARK_HAEMATOXYLIN[:, None, None] * small
    rgb *= stain[:, None, None]
    rgb += rng.standard_normal((1, *shape), dtype=np.float32) * 4.0
    image = np.clip(rgb, 0, 255).astype(np.uint8)

    # per-spot morphology, measured in each spot's disc-sized central window
    half = pitch // 4

    def per_spot(mask: np.ndarray) -> np.ndarray:
        blocks = mask.reshape(grid, pitch, grid, pitch)[:, pitch // 2 - half : pitch // 2 + half, :, :]
        return blocks[:, :, :, pitch // 2 - half : pitch // 2 + half].mean(axis=(1, 3))  # (grid_y, grid_x)

    features = {
        "tumour_nuclei": per_spot(big),
        "fibres": per_spot(fibre * tissue_px),
        "immune_nuclei": per_spot(small),
        "tissue": per_spot(tissue_px),
    }
    return image, features, features["tissue"]


def _gene_parameters(rng: np.random.Generator, n_genes: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Programme, baseline log-mean, feature weights ``(n_genes, n_features)`` and NB shape of each gene."""
    programmes = [_PROGRAMMES[g % len(_PROGRAMMES)] for g in range(n_genes)]
    # feature scales: typical maxima of the per-spot fractions, so weights act on [0, ~1]
    weights = np.zeros((n_genes, len(_FEATURES)))
    base = rng.uniform(np.log(4.0), np.log(40.0), n_genes)
    theta = rng.uniform(5.0, 20.0, n_genes)
    column = {"tumour": 0, "stroma": 1, "immune": 2}
    for g, programme in enumerate(programmes):
        if programme in column:
            weights[g, column[programme]] = rng.uniform(1.5, 2.5) * rng.choice([1.0, 1.0, -0.6])
        elif programme == "mixed":
            weights[g, :3] = rng.uniform(-1.5, 1.5, 3)
        elif programme == "constant":
            base[g] = rng.uniform(np.log(60.0), np.log(120.0))
            theta[g] = 1e4
    return programmes, base, weights, theta


def synthetic(
    *,
    n_sections: int = 3,
    n_genes: int = 50,
    seed: int = 0,
    n_patients: int | None = None,
    grid: int = 12,
    pitch: int = 160,
    mpp: float = 1.0,
    library_size: float = 1.0,
) -> SpatialData:
    """Generate a small H&E-like tissue with spot expression that depends on the morphology under each spot.

    Each section is a ``grid × grid`` square lattice of spots, ``pitch`` pixels apart, on an image of
    ``grid * pitch`` pixels per side (1920 px by default). The tissue mixes three morphologies that vary smoothly
    over a few spot distances: *tumour-like* areas (dense, large purple nuclei), *stroma-like* areas (pink fibres,
    sparse small nuclei) and *immune-like* areas (dense small dark dots), inside a white background. Only spots
    with at least half of their disc on tissue are kept (about 115–125 of the 144 per section by default).

    Genes follow programmes (``var["programme"]``, cycled over the genes): ``tumour``, ``stroma`` and ``immune``
    genes depend on the matching morphology measured in the pixels of each spot (``obsm["morphology"]``), ``mixed``
    genes on all three, ``noise`` genes on nothing, ``constant`` genes are high and nearly constant. Counts are
    negative binomial around ``library × exp(base + weights · morphology)`` with a per-spot library size that varies
    (log-normal) and scales with the tissue fraction, so a CNN can learn them from the spot crops.

    Parameters
    ----------
    n_sections
        Number of sections, named ``S0``, ``S1``, ...
    n_genes
        Number of genes, named ``G000``, ``G001``, ...
    seed
        Seed of the generator; the same arguments always give the same data. Section ``i`` depends only on
        ``seed``, ``i``, ``grid`` and ``pitch``, and the gene programmes only on ``seed`` and ``n_genes``.
    n_patients
        Number of patients ``P0``, ``P1``, ...; consecutive sections are split over them as evenly as possible
        (``n_sections=4, n_patients=2``: ``S0, S1`` → ``P0``, ``S2, S3`` → ``P1``). ``None`` gives each section
        its own patient.
    grid
        Spots per side of the lattice.
    pitch
        Centre-to-centre spot distance in pixels (even, at least 8). With the default 160 px, a 224 px spot crop
        and a 448 px context crop cover 1.4 and 2.8 spot distances.
    mpp
        Microns per pixel recorded in ``uns["stpred"]["mpp"]``; ``pitch_um = pitch * mpp`` and the spot diameter
        is half the pitch, as in legacy ST.
    library_size
        Multiplies every expected count.

    Returns
    -------
    SpatialData in the stpred contract: images ``"S0_hne"``, ``"S1_hne"``, ..., (multiscale RGB uint8), shapes ``"S0_spots"``, ...
    (circles, radius ``pitch / 4``), table ``"table"`` with raw counts (``technology = "synthetic"``), plus the
    ground truth ``var["programme"]`` and ``obsm["morphology"]`` (columns ``tumour_nuclei``, ``fibres``,
    ``immune_nuclei``, ``tissue``: fractions of the spot window covered by each).

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=4, n_patients=2, seed=0)
    >>> sdata.tables["table"].obs["patient"].value_counts().sort_index().index.tolist()
    ['P0', 'P1']
    """
    from scipy import sparse

    from ..io._concat import concat
    from ..io._legacy_st import _hne_image, _section_sdata, _section_table, _spot_circles

    for name, value in (("n_sections", n_sections), ("n_genes", n_genes), ("grid", grid), ("pitch", pitch)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            msg = f"Expected `{name}` to be an integer, found {type(value).__name__}."
            raise TypeError(msg)
        check_positive(value, name=name)
    check_positive(mpp, name="mpp")
    check_positive(library_size, name="library_size")
    if pitch < 8 or pitch % 8:
        msg = f"Expected `pitch` to be a multiple of 8 and at least 8, found {pitch}."
        raise ValueError(msg)
    if n_patients is None:
        patients = [f"P{i}" for i in range(n_sections)]
    else:
        check_positive(n_patients, name="n_patients")
        if n_patients > n_sections:
            msg = f"Expected `n_patients` <= `n_sections` ({n_sections}), found {n_patients}."
            raise ValueError(msg)
        patients = [f"P{p}" for p, part in enumerate(np.array_split(np.arange(n_sections), n_patients)) for _ in part]

    programmes, base, weights, theta = _gene_parameters(np.random.default_rng([seed, 1_000_003]), n_genes)
    genes = [f"G{g:03d}" for g in range(n_genes)]
    parts = []
    for i in range(n_sections):
        section = f"S{i}"
        rng = np.random.default_rng([seed, i])
        image, features, tissue = _section(rng, grid=grid, pitch=pitch)
        keep = tissue.ravel() >= 0.5
        if not keep.any():  # pragma: no cover - the outline always covers the centre
            keep[:] = True
        ay, ax = np.divmod(np.flatnonzero(keep), grid)
        morph = np.stack([features[f].ravel()[keep] for f in _FEATURES], axis=1)
        library = library_size * np.exp(rng.normal(0.0, 0.35, len(ax))) * (0.3 + 0.7 * morph[:, 3])
        mean = library[:, None] * np.exp(base[None, :] + (morph / _FEATURE_SCALE) @ weights.T)
        counts = rng.poisson(rng.gamma(theta[None, :], mean / theta[None, :]))
        xy = np.stack([(ax + 0.5) * pitch, (ay + 0.5) * pitch], axis=1)
        table = _section_table(
            sparse.csr_matrix(counts.astype(np.float32)),
            genes,
            spots=[f"{x}x{y}" for x, y in zip(ax, ay)],
            array_xy=np.stack([ax, ay], axis=1),
            pixel_xy=xy,
            section=section,
            patient=patients[i],
            mpp=mpp,
            spot_diameter_um=pitch * mpp / 2.0,
            pitch_um=pitch * mpp,
            technology="synthetic",
        )
        table.var["programme"] = programmes
        table.obsm["morphology"] = morph.astype(np.float32)
        parts.append(
            _section_sdata(section, _hne_image(image, section), _spot_circles(xy, pitch / 4.0, section), table)
        )
    sdata = concat(parts)
    out = sdata.tables["table"]
    out.var["programme"] = out.var["programme"].astype("category")
    out.uns["stpred"]["dataset"] = {"name": "synthetic", "seed": int(seed), "grid": int(grid), "pitch": int(pitch)}
    return sdata
