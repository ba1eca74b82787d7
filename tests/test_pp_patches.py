"""Tests of ``stpred.pp.extract_patches`` and the ``PatchBank``: crops are compared with the image pixels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

import stpred
from stpred.pp import PatchBank
from stpred.pp._patches import get_patch_bank

if TYPE_CHECKING:
    from pathlib import Path

    from spatialdata import SpatialData

SIZE, CONTEXT = 16, 48  # the tiny images are 192 px with spots every 32 px, centres at 16, 48, ...


@pytest.fixture(scope="module")
def _tiny_once() -> SpatialData:
    sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32, seed=0)
    stpred.pp.select_genes(sdata, n_top=4)
    return sdata


@pytest.fixture
def tiny(_tiny_once: SpatialData) -> SpatialData:
    import spatialdata

    return spatialdata.deepcopy(_tiny_once)


def _image(sdata: SpatialData, section: str, level: str = "scale0") -> np.ndarray:
    element = sdata.images[f"{section}_hne"]
    arr = element[level]["image"] if level in getattr(element, "children", {}) else element
    return np.asarray(arr.values)


def _reference_crops(image: np.ndarray, xy: np.ndarray, side: int) -> np.ndarray:
    """Crops by slicing a zero-padded copy of the image, one spot at a time (the convention in the docstring)."""
    padded = np.pad(image, ((0, 0), (side, side), (side, side)))
    out = []
    for x, y in xy:
        y0 = int(np.floor(y)) - side // 2 + side
        x0 = int(np.floor(x)) - side // 2 + side
        out.append(padded[:, y0 : y0 + side, x0 : x0 + side])
    return np.stack(out)


def _smooth_pattern(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 90 * np.sin(2 * np.pi * xx / 61.0) * np.cos(2 * np.pi * yy / 47.0)
    g = 128 + 90 * np.cos(2 * np.pi * (xx + yy) / 83.0)
    b = 60 + 0.5 * xx + 0.3 * yy
    return np.clip(np.stack([r, g, b]), 0, 255).round().astype(np.uint8)


def _replace_image(sdata: SpatialData, section: str, image: np.ndarray, *, scale: float = 1.0) -> None:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    t = Identity() if scale == 1.0 else Scale([scale, scale], axes=("y", "x"))
    sdata.images[f"{section}_hne"] = Image2DModel.parse(
        image, dims=("c", "y", "x"), transformations={section: t}, chunks=(3, 64, 64)
    )


# ------------------------------------------------------------------------------------------------------------------
# native resolution


def test_native_crops_equal_image_pixels(tiny: SpatialData) -> None:
    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    table = tiny.tables["stpred"]
    assert isinstance(bank, PatchBank)
    assert len(bank) == table.n_obs
    assert list(bank.obs_names) == list(table.obs_names)
    assert bank.spot.dtype == np.uint8
    assert bank.spot.shape == (table.n_obs, 3, SIZE, SIZE)
    assert bank.context.shape == (table.n_obs, 3, CONTEXT, CONTEXT)
    assert bank.mpp is None
    assert bank.native_mpp == {"S0": 1.0, "S1": 1.0}
    for section in ("S0", "S1"):
        rows = (table.obs["section"] == section).to_numpy()
        xy = table.obsm["spatial"][rows]
        image = _image(tiny, section)
        np.testing.assert_array_equal(bank.spot[rows], _reference_crops(image, xy, SIZE))
        np.testing.assert_array_equal(bank.context[rows], _reference_crops(image, xy, CONTEXT))
        assert (bank.sections[rows] == section).all()


def test_border_spots_are_zero_padded(tiny: SpatialData) -> None:
    table = tiny.tables["stpred"]
    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    xy = table.obsm["spatial"]
    # a context window of a spot 16 px from the top edge starts 8 px above the image
    top = np.flatnonzero(xy[:, 1] == 16)
    assert len(top) > 0
    assert (bank.context[top][:, :, :8, :] == 0).all()
    assert (bank.context[top][:, :, 8:, :].reshape(len(top), -1).max(axis=1) > 0).all()  # tissue/background below
    right = np.flatnonzero(xy[:, 0] == 176)  # 192 - 16: the window ends 8 px right of the image
    if len(right):
        assert (bank.context[right][:, :, :, -8:] == 0).all()


def test_odd_sizes_and_no_context(tiny: SpatialData) -> None:
    table = tiny.tables["stpred"]
    bank = stpred.pp.extract_patches(tiny, size=7, context_size=None, progress=False)
    assert bank.context is None
    assert bank.context_size is None
    rows = (table.obs["section"] == "S1").to_numpy()
    np.testing.assert_array_equal(bank.spot[rows], _reference_crops(_image(tiny, "S1"), table.obsm["spatial"][rows], 7))


def test_bands_give_the_same_crops(tiny: SpatialData, monkeypatch: pytest.MonkeyPatch) -> None:
    # a tiny memory limit forces the image to be loaded in horizontal bands
    from stpred.pp import _patches

    whole = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    monkeypatch.setattr(_patches, "_MAX_BUFFER_BYTES", 3 * 240 * 100)
    assert len(_patches._bands(np.array([16, 48, 80, 112, 144, 176]), CONTEXT, 3 * 240)) > 1
    banded = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    np.testing.assert_array_equal(banded.spot, whole.spot)
    np.testing.assert_array_equal(banded.context, whole.context)


def test_image_must_be_uint8_rgb(tiny: SpatialData) -> None:
    _replace_image(tiny, "S0", _smooth_pattern(192, 192)[:2])
    with pytest.raises(ValueError, match=r"Expected an RGB image \(c=3, y, x\) for section 'S0'"):
        stpred.pp.extract_patches(tiny, size=4, progress=False)
    _replace_image(tiny, "S0", _smooth_pattern(192, 192).astype(np.float32))
    with pytest.raises(TypeError, match="Expected a uint8 image for section 'S0', found float32"):
        stpred.pp.extract_patches(tiny, size=4, progress=False)


def test_sections_subset(tiny: SpatialData) -> None:
    table = tiny.tables["stpred"]
    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=None, sections=["S1"], progress=False)
    rows = (table.obs["section"] == "S1").to_numpy()
    assert list(bank.obs_names) == list(table.obs_names[rows])
    bank.check_aligned(table)
    assert get_patch_bank(tiny) is bank
    assert tiny.tables["stpred"].uns["stpred"]["patches"]["sections"] == ["S1"]


# ------------------------------------------------------------------------------------------------------------------
# resampling to a physical scale


def test_mpp_equal_to_native_is_exact(tiny: SpatialData) -> None:
    native = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    same = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, mpp=1.0, progress=False)
    np.testing.assert_array_equal(native.spot, same.spot)
    np.testing.assert_array_equal(native.context, same.context)
    assert same.mpp == 1.0
    assert same.level_mpp == {"S0": 1.0, "S1": 1.0}


def test_mpp_picks_the_pyramid_level(tiny: SpatialData) -> None:
    # the synthetic images have a 2× pyramid level: mpp=2 cuts exact pixels from it
    table = tiny.tables["stpred"]
    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, mpp=2.0, progress=False)
    assert bank.level_mpp == {"S0": 2.0, "S1": 2.0}
    rows = (table.obs["section"] == "S0").to_numpy()
    level = _image(tiny, "S0", "scale1")
    xy = table.obsm["spatial"][rows] / 2
    np.testing.assert_array_equal(bank.spot[rows], _reference_crops(level, xy, SIZE))
    np.testing.assert_array_equal(bank.context[rows], _reference_crops(level, xy, CONTEXT))


def test_mpp_resampling_gives_the_physical_field(tiny: SpatialData) -> None:
    # single-scale image with a smooth known pattern: crops at mpp = 2 × native cover 2× the pixels, and equal a
    # 2×2 block mean of the native window (the antialiased bilinear filter differs from a box filter only slightly)
    pattern = _smooth_pattern(192, 192)
    _replace_image(tiny, "S0", pattern)
    table = tiny.tables["stpred"]
    bank = stpred.pp.extract_patches(tiny, size=8, context_size=None, mpp=2.0, sections=["S0"], progress=False)
    assert bank.level_mpp == {"S0": 1.0}
    rows = (table.obs["section"] == "S0").to_numpy()
    native = _reference_crops(pattern, table.obsm["spatial"][rows], 16).astype(np.float64)
    box = native.reshape(-1, 3, 8, 2, 8, 2).mean(axis=(3, 5))
    interior = (table.obsm["spatial"][rows] >= 8).all(axis=1) & (table.obsm["spatial"][rows] <= 184).all(axis=1)
    diff = np.abs(bank.spot[interior].astype(np.float64) - box[interior])
    assert diff.mean() < 1.5
    assert diff.max() <= 6


def test_same_physical_field_from_two_scanners(tiny: SpatialData) -> None:
    import spatialdata

    # the same tissue scanned at 1 µm/px (S0) and at 2 µm/px (S1's image replaced by the 2× block mean of S0's,
    # placed with a Scale(2) transformation): crops at mpp=2 agree
    pattern = _smooth_pattern(192, 192)
    coarse = pattern.reshape(3, 96, 2, 96, 2).astype(np.float64).mean(axis=(2, 4)).round().astype(np.uint8)
    fine_sd, coarse_sd = tiny, spatialdata.deepcopy(tiny)
    _replace_image(fine_sd, "S0", pattern)
    _replace_image(coarse_sd, "S0", coarse, scale=2.0)
    kw = {"size": 12, "context_size": 24, "mpp": 2.0, "sections": ["S0"], "progress": False}
    a = stpred.pp.extract_patches(fine_sd, **kw)
    b = stpred.pp.extract_patches(coarse_sd, **kw)
    assert a.level_mpp == {"S0": 1.0}
    assert b.level_mpp == {"S0": 2.0}
    xy = tiny.tables["stpred"].obsm["spatial"][(tiny.tables["stpred"].obs["section"] == "S0").to_numpy()]
    # the coarse crops are exact pixel copies of the coarse image
    np.testing.assert_array_equal(b.spot, _reference_crops(coarse, xy / 2, 12))
    diff = np.abs(a.context.astype(np.float64) - b.context.astype(np.float64))
    inside = (xy >= 24).all(axis=1) & (xy <= 168).all(axis=1)
    assert diff[inside].mean() < 1.5
    assert diff[inside].max() <= 6


# ------------------------------------------------------------------------------------------------------------------
# the bank: registry, subset, save/load


def test_registry_and_missing_bank(tiny: SpatialData) -> None:
    with pytest.raises(KeyError, match=r"No patches for this SpatialData; run `stpred.pp.extract_patches\(sdata\)`"):
        get_patch_bank(tiny)
    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    other = stpred.pp.extract_patches(tiny, size=8, context_size=None, progress=False)
    assert get_patch_bank(tiny) is other  # the latest
    assert get_patch_bank(tiny, size=SIZE) is bank
    assert get_patch_bank(tiny, context_size=CONTEXT) is bank
    with pytest.raises(KeyError, match=r"Patches exist with \(size, context_size\)"):
        get_patch_bank(tiny, size=99)
    patches = tiny.tables["stpred"].uns["stpred"]["patches"]
    assert patches == {"size": 8, "sections": ["S0", "S1"]}
    assert any(k.endswith("extract_patches") for k in tiny.tables["stpred"].uns["stpred"]["history"])
    # a table whose rows no longer match the cached banks: the bank is re-cut from the recorded recipe
    tiny.tables["stpred"] = tiny.tables["stpred"][::-1].copy()
    recut = get_patch_bank(tiny)
    assert recut is not other
    assert list(recut.obs_names) == list(tiny.tables["stpred"].obs_names)
    np.testing.assert_array_equal(recut.spot, other.spot[::-1])


def test_bank_is_found_again_on_a_copy_without_the_cache(tiny: SpatialData) -> None:
    import spatialdata

    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    fresh = spatialdata.deepcopy(tiny)  # a new object: nothing cached for it, only uns["stpred"]["patches"]
    again = get_patch_bank(fresh, size=SIZE, context_size=CONTEXT)
    assert again is not bank
    np.testing.assert_array_equal(again.spot, bank.spot)
    np.testing.assert_array_equal(again.context, bank.context)


def test_subset_and_positions(tiny: SpatialData) -> None:
    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, progress=False)
    names = list(bank.obs_names[[5, 0, 3]])
    sub = bank.subset(names)
    assert list(sub.obs_names) == names
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.spot, bank.spot[[5, 0, 3]])
    np.testing.assert_array_equal(sub.context, bank.context[[5, 0, 3]])
    np.testing.assert_array_equal(bank.positions(names), [5, 0, 3])
    mask = bank.sections == "S1"
    assert list(bank.subset(mask).obs_names) == list(bank.obs_names[mask])
    with pytest.raises(KeyError, match=r"1 of 2 rows have no patches \(first: \['nope'\]\)"):
        bank.subset([names[0], "nope"])
    with pytest.raises(ValueError, match="A boolean mask must have length"):
        bank.subset(mask[:-1])
    with pytest.raises(ValueError, match="The PatchBank does not match the table: 3 crops vs"):
        sub.check_aligned(tiny.tables["stpred"])
    assert "PatchBank of" in repr(bank)
    assert "native resolution" in repr(bank)


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")  # zarr 3 notice from spatialdata's write
def test_save_load_round_trip(tiny: SpatialData, tmp_path: Path) -> None:
    import spatialdata
    import zarr

    bank = stpred.pp.extract_patches(tiny, size=SIZE, context_size=CONTEXT, mpp=2.0, progress=False)
    path = tmp_path / "patches.zarr"
    bank.save(path)
    assert zarr.open_group(str(path), mode="r").metadata.zarr_format == 3
    back = PatchBank.load(path)
    np.testing.assert_array_equal(back.spot, bank.spot)
    np.testing.assert_array_equal(back.context, bank.context)
    assert list(back.obs_names) == list(bank.obs_names)
    assert list(back.sections) == list(bank.sections)
    assert (back.size, back.context_size, back.mpp) == (SIZE, CONTEXT, 2.0)
    assert back.native_mpp == bank.native_mpp
    assert back.level_mpp == bank.level_mpp
    # the path is recorded, so the bank is found again for the same data read back from disk
    assert tiny.tables["stpred"].uns["stpred"]["patches"]["path"] == str(path.resolve())
    tiny.write(tmp_path / "data.zarr")
    again = spatialdata.read_zarr(tmp_path / "data.zarr")
    found = get_patch_bank(again)
    np.testing.assert_array_equal(found.spot, bank.spot)
    assert get_patch_bank(again) is found  # registered after loading
    # no context, overwrite rules, bad paths
    small = stpred.pp.extract_patches(tiny, size=4, context_size=None, progress=False)
    with pytest.raises(FileExistsError, match=r"already exists; pass `overwrite=True`"):
        small.save(path)
    small.save(path, overwrite=True)
    assert PatchBank.load(path).context is None
    with pytest.raises(FileNotFoundError, match="No PatchBank at"):
        PatchBank.load(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(ValueError, match="is not a PatchBank store"):
        PatchBank.load(tmp_path / "other.zarr")


def test_patchbank_validates_its_arrays() -> None:
    import pandas as pd

    spot = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    names = pd.Index(["a", "b"])
    with pytest.raises(TypeError, match="Expected `spot` to be a uint8 numpy array"):
        PatchBank(spot=spot.astype(np.float32), context=None, obs_names=names, sections=["s", "s"], size=4)
    with pytest.raises(ValueError, match=r"Expected `spot` of shape \(2, 3, 5, 5\)"):
        PatchBank(spot=spot, context=None, obs_names=names, sections=["s", "s"], size=5)
    with pytest.raises(ValueError, match="must both be given or both be None"):
        PatchBank(spot=spot, context=spot, obs_names=names, sections=["s", "s"], size=4)
    with pytest.raises(ValueError, match="must be unique"):
        PatchBank(spot=spot, context=None, obs_names=["a", "a"], sections=["s", "s"], size=4)


# ------------------------------------------------------------------------------------------------------------------
# errors


def test_extract_patches_errors(tiny: SpatialData) -> None:
    kw = {"progress": False}
    with pytest.raises(ValueError, match="Expected `size` to be positive, found 0"):
        stpred.pp.extract_patches(tiny, size=0, **kw)
    with pytest.raises(TypeError, match="Expected `size` to be a positive int, found 2.5"):
        stpred.pp.extract_patches(tiny, size=2.5, **kw)
    with pytest.raises(ValueError, match="Expected `context_size` to be positive, found -4"):
        stpred.pp.extract_patches(tiny, size=4, context_size=-4, **kw)
    with pytest.raises(ValueError, match="Expected `mpp` to be positive"):
        stpred.pp.extract_patches(tiny, size=4, mpp=0.0, **kw)
    with pytest.raises(TypeError, match="Expected `mpp` to be a positive number or None, found '1'"):
        stpred.pp.extract_patches(tiny, size=4, mpp="1", **kw)
    with pytest.raises(ValueError, match=r"Unknown section\(s\) \['S7'\]"):
        stpred.pp.extract_patches(tiny, size=4, sections=["S7"], **kw)
    del tiny.tables["stpred"].uns["stpred"]["mpp"]["S1"]
    with pytest.raises(KeyError, match=r"needs the microns per pixel of section 'S1', but"):
        stpred.pp.extract_patches(tiny, size=4, mpp=2.0, **kw)
    del tiny.images["S1_hne"]
    with pytest.raises(KeyError, match=r"No image 'S1_hne' for section 'S1' in `sdata.images`; found \['S0_hne'\]"):
        stpred.pp.extract_patches(tiny, size=4, **kw)
    del tiny.tables["stpred"]
    with pytest.raises(KeyError, match=r"No table 'stpred'.*Run `stpred.pp.select_genes\(sdata\)` first"):
        stpred.pp.extract_patches(tiny, size=4, **kw)


def test_spot_centres_outside_the_image(tiny: SpatialData) -> None:
    from shapely.geometry import Point

    shapes = tiny.shapes["S0_spots"]
    shapes.loc[0, "geometry"] = Point(-40.0, 16.0)
    shapes.loc[1, "geometry"] = Point(16.0, 500.0)
    with pytest.raises(ValueError, match=r"2 of \d+ spot centres of section 'S0' lie outside its image \(192×192"):
        stpred.pp.extract_patches(tiny, size=4, progress=False)
    # partly outside (centre inside, window not): zero-padded, no error
    shapes.loc[0, "geometry"] = Point(0.5, 0.5)
    shapes.loc[1, "geometry"] = Point(191.9, 191.9)
    bank = stpred.pp.extract_patches(tiny, size=4, context_size=None, sections=["S0"], progress=False)
    image = _image(tiny, "S0")
    row0 = bank.positions(tiny.tables["stpred"].obs_names[tiny.tables["stpred"].obs["spot_id"].to_numpy() == 0][:1])
    np.testing.assert_array_equal(bank.spot[row0[0]], _reference_crops(image, np.array([[0.5, 0.5]]), 4)[0])
    assert (bank.spot[row0[0]][:, :2, :] == 0).all()
    assert (bank.spot[row0[0]][:, 2:, 2:] > 0).all()


# ------------------------------------------------------------------------------------------------------------------
# real data


@pytest.mark.her2st
def test_her2st_crops_equal_pil_decoded_jpeg(her2st_path: Path) -> None:
    from PIL import Image

    import stpred.io

    root = her2st_path
    if not hasattr(stpred.io, "read_legacy_st"):
        pytest.skip("stpred.io.read_legacy_st is not available yet")
    jpg = root / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
    sdata = stpred.io.read_legacy_st(
        root / "ST-cnts" / "C2.tsv.gz", root / "ST-spotfiles" / "C2_selection.tsv", jpg, section="C2", patient="C"
    )
    stpred.pp.select_genes(sdata, n_top=10)
    bank = stpred.pp.extract_patches(sdata, size=224, context_size=448, progress=False)
    table = sdata.tables["stpred"]
    assert len(bank) == table.n_obs > 100
    Image.MAX_IMAGE_PIXELS = None  # the scan has 92 Mpx; PIL's bomb guard stops at 89 Mpx
    with Image.open(jpg) as im:
        pixels = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    xy = table.obsm["spatial"]
    # a few spots, including the ones closest to the image borders (context windows zero-padded there)
    margin = np.minimum.reduce([xy[:, 0], xy[:, 1], pixels.shape[2] - xy[:, 0], pixels.shape[1] - xy[:, 1]])
    picks = np.unique(np.r_[np.argsort(margin)[:2], np.linspace(0, len(xy) - 1, 4).astype(int)])
    np.testing.assert_array_equal(bank.spot[picks], _reference_crops(pixels, xy[picks], 224))
    np.testing.assert_array_equal(bank.context[picks], _reference_crops(pixels, xy[picks], 448))
