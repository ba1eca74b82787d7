"""Tiles over tissue (``pp.tile``) and their plot (``pl.tissue``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

import stpred
from stpred.pl._tissue import tissue_data
from stpred.pp._tile import lattice_centres, tissue_fraction

if TYPE_CHECKING:
    from pathlib import Path

    from spatialdata import SpatialData


def _names(sdata: SpatialData) -> dict[str, list[str]]:
    return {kind: sorted(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")}


def _nn_distances(xy: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


def _image_sdata(rgb: np.ndarray, transformations: dict, *, key: str = "img") -> SpatialData:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    image = Image2DModel.parse(
        rgb, dims=("c", "y", "x"), scale_factors=[2, 2], transformations=transformations, chunks=256
    )
    return SpatialData(images={key: image})


@pytest.fixture(scope="module")
def one_section() -> SpatialData:
    return stpred.datasets.synthetic(n_sections=1, n_genes=4, seed=0)


@pytest.fixture
def sdata1(one_section: SpatialData) -> SpatialData:
    import spatialdata

    return spatialdata.deepcopy(one_section)


# ------------------------------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("layout", ["square", "hex"])
def test_lattice_spacing_and_fit(layout: str) -> None:
    xy, ij = lattice_centres(1000.0, 700.0, size_um=55.0, stride_um=100.0, layout=layout)
    assert np.allclose(_nn_distances(xy), 100.0)
    half = 27.5
    assert (xy - half >= -1e-9).all()
    assert (xy[:, 0] + half <= 1000 + 1e-9).all()
    assert (xy[:, 1] + half <= 700 + 1e-9).all()
    # the pattern is centred: equal margins left/right and top/bottom
    assert np.isclose(xy[:, 0].min() - half, 1000 - xy[:, 0].max() - half)
    assert np.isclose(xy[:, 1].min() - half, 700 - xy[:, 1].max() - half)
    assert len({tuple(r) for r in ij}) == len(ij)
    if layout == "square":
        assert len(xy) == (int((1000 - 55) // 100) + 1) * (int((700 - 55) // 100) + 1)
    else:
        rows = np.unique(np.round(xy[:, 1], 6))
        assert np.allclose(np.diff(rows), 100 * np.sqrt(3) / 2)
        # neighbours along a row differ by 2 in the doubled x index
        assert set(np.unique(ij[:, 0] % 2 == ij[:, 1] % 2)) == {True}


def test_tissue_fraction_square_and_disc() -> None:
    mask = np.zeros((10, 10), dtype=np.int32)
    mask[:, :5] = 1  # left half tissue; one mask pixel = 4 full-resolution pixels
    xy = np.array([[20.0, 20.0], [10.0, 20.0], [30.0, 20.0]])
    square = tissue_fraction(mask, xy, size_px=8.0, layout="square", scale=(4.0, 4.0))
    disc = tissue_fraction(mask, xy, size_px=8.0, layout="hex", scale=(4.0, 4.0))
    np.testing.assert_allclose(square, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(disc, [0.5, 1.0, 0.0])


def test_tissue_fraction_batches_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    from stpred.pp import _tile

    rng = np.random.default_rng(0)
    mask = (rng.random((60, 80)) > 0.5).astype(np.int32)
    xy = rng.uniform(-20, 340, size=(5000, 2))  # some tiles partly outside the mask
    batched = tissue_fraction(mask, xy, size_px=12.0, layout="hex", scale=(4.0, 4.0))
    monkeypatch.setattr(_tile, "_BATCH", 10**6)
    np.testing.assert_array_equal(batched, tissue_fraction(mask, xy, size_px=12.0, layout="hex", scale=(4.0, 4.0)))
    assert 0 < batched.mean() < 0.5  # half tissue inside, none outside


# ------------------------------------------------------------------------------------------------- synthetic
def test_tile_synthetic_square(sdata1: SpatialData) -> None:
    from spatialdata.models import TableModel, get_table_keys

    before = _names(sdata1)
    assert stpred.pp.tile(sdata1, size_um=100) is None
    after = _names(sdata1)
    assert after["images"] == before["images"]
    assert set(after["shapes"]) == {*before["shapes"], "S0_tiles"}
    assert set(after["tables"]) == {*before["tables"], "S0_tiles_table"}
    assert after["labels"] == ["S0_tiles_mask"]

    table = sdata1.tables["S0_tiles_table"]
    shapes = sdata1.shapes["S0_tiles"]
    TableModel().validate(table)
    regions, region_key, instance_key = get_table_keys(table)
    assert (list(np.atleast_1d(regions)), region_key, instance_key) == (["S0_tiles"], "region", "spot_id")
    assert table.shape == (len(shapes), 0)
    assert (table.obs["spot_id"].to_numpy() == shapes.index.to_numpy()).all()
    geom = shapes.geometry.centroid
    np.testing.assert_allclose(np.c_[geom.x, geom.y], table.obsm["spatial"])
    np.testing.assert_allclose(table.obs[["x_px", "y_px"]].to_numpy(), table.obsm["spatial"])
    np.testing.assert_allclose(table.obs[["x_um", "y_um"]].to_numpy(), table.obsm["spatial"] * 1.0)  # mpp 1
    assert np.allclose(shapes.geometry.area, 100.0**2)
    assert (table.obs["tissue_fraction"] >= 0.5).all()
    assert (table.obs["section"] == "S0").all()
    meta = table.uns["stpred"]
    assert meta["mpp"] == {"S0": 1.0}
    assert meta["technology"] == {"S0": "tiles"}
    tiles = meta["tiles"]
    assert tiles["image_key"] == "S0_hne"
    assert tiles["layout"] == "square"
    assert tiles["size_um"] == 100
    assert tiles["stride_um"] == 100
    assert tiles["detection"]["function"] == "squidpy.experimental.im.detect_tissue"
    assert tiles["n_tiles"] == table.n_obs < tiles["n_grid"] == 19 * 19
    # the mask is small (never full resolution) and aligned with the image
    mask = sdata1.labels["S0_tiles_mask"]
    assert mask.shape[0] * mask.shape[1] < 1920 * 1920 / 16
    # the spots (kept where at least half of each disc is tissue) are covered by tiles
    spots = sdata1.tables["table"].obsm["spatial"]
    half = 50.0
    xy = table.obsm["spatial"]
    covered = [(np.abs(xy - s) <= half).all(axis=1).any() for s in spots]
    assert np.mean(covered) > 0.95


def test_tile_full_grid_and_hex(sdata1: SpatialData) -> None:
    stpred.pp.tile(sdata1, size_um=100, tissue=False, key_added="grid")
    grid = sdata1.tables["grid_table"]
    assert grid.n_obs == 19 * 19
    assert grid.obs["tissue_fraction"].isna().all()
    assert "grid_mask" not in sdata1.labels
    stpred.pp.tile(sdata1, size_um=100, layout="hex", tissue=False, key_added="hexgrid")
    hexgrid = sdata1.tables["hexgrid_table"]
    # a hexagonal lattice packs 2/√3 as many centres as a square one with the same spacing
    assert hexgrid.n_obs / grid.n_obs == pytest.approx(2 / np.sqrt(3), rel=0.06)
    for table in (grid, hexgrid):
        xy = table.obs[["x_um", "y_um"]].to_numpy()
        np.testing.assert_allclose(_nn_distances(xy), 100.0)
    circles = sdata1.shapes["hexgrid"]
    assert (circles.geometry.geom_type == "Point").all()
    np.testing.assert_allclose(circles["radius"], 50.0)
    # on tissue, Visium-like: 55 µm circles 100 µm apart
    stpred.pp.tile(sdata1, size_um=55, stride_um=100, layout="hex", key_added="visium")
    visium = sdata1.tables["visium_table"]
    np.testing.assert_allclose(np.median(_nn_distances(visium.obs[["x_um", "y_um"]].to_numpy())), 100.0)
    assert 0 < visium.n_obs < hexgrid.n_obs


def test_tile_centres_in_mask(sdata1: SpatialData) -> None:
    stpred.pp.tile(sdata1, size_um=80, min_tissue_fraction=1.0)
    table = sdata1.tables["S0_tiles_table"]
    mask = np.asarray(sdata1.labels["S0_tiles_mask"].data)
    sy, sx = 1920 / mask.shape[0], 1920 / mask.shape[1]
    xy = table.obsm["spatial"]
    assert (mask[(xy[:, 1] // sy).astype(int), (xy[:, 0] // sx).astype(int)] > 0).all()
    assert (table.obs["tissue_fraction"] == 1.0).all()


def test_tile_um_through_scale_transform() -> None:
    from spatialdata import transform
    from spatialdata.transformations import Scale, Sequence, Translation, get_transformation

    rng = np.random.default_rng(0)
    rgb = np.full((3, 800, 1000), 245, dtype=np.uint8)
    rgb[:, 200:600, 250:750] = np.array([200, 90, 170], dtype=np.uint8)[:, None, None]  # a pink block of "tissue"
    rgb = np.clip(rgb.astype(int) + rng.integers(-5, 6, rgb.shape), 0, 255).astype(np.uint8)
    # the coordinate system is in microns: 0.5 µm per pixel, and the image starts 1000 µm to the right
    to_um = Sequence([Scale([0.5, 0.5], axes=("y", "x")), Translation([1000.0, 0.0], axes=("x", "y"))])
    sdata = _image_sdata(rgb, {"global": to_um})
    stpred.pp.tile(sdata, size_um=20, mpp=0.5, section="A")
    table = sdata.tables["A_tiles_table"]
    assert table.uns["stpred"]["tiles"]["mpp_source"] == "argument"
    shapes_um = transform(sdata.shapes["A_tiles"], to_coordinate_system="global")
    c = shapes_um.geometry.centroid
    xy_cs = np.c_[c.x, c.y]
    # tile centres in the µm coordinate system = µm from the image corner + the image's offset
    np.testing.assert_allclose(xy_cs, table.obs[["x_um", "y_um"]].to_numpy() + [1000.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(_nn_distances(xy_cs), 20.0)
    np.testing.assert_allclose(shapes_um.geometry.area, 20.0**2)
    # tiles lie on the pink block (125..375 µm × 100..300 µm from the image corner), not on the glass
    x_um, y_um = table.obs["x_um"].to_numpy(), table.obs["y_um"].to_numpy()
    assert (x_um > 125 - 10).all()
    assert (x_um < 375 + 10).all()
    assert (y_um > 100 - 10).all()
    assert (y_um < 300 + 10).all()
    assert table.n_obs >= (250 // 20 - 1) * (200 // 20 - 1)
    # the mask labels map onto the same place in µm
    mask = sdata.labels["A_tiles_mask"]
    m = get_transformation(mask, to_coordinate_system="global").to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    corners = m @ np.array([[0.0, 0.0, 1.0], [mask.sizes["x"], mask.sizes["y"], 1.0]]).T
    np.testing.assert_allclose(corners[:2].T, [[1000.0, 0.0], [1500.0, 400.0]])


def test_tile_single_scale_image_is_coarsened() -> None:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    rgb = np.full((3, 770, 1010), 245, dtype=np.uint8)
    rgb[:, 200:600, 250:750] = np.array([200, 90, 170], dtype=np.uint8)[:, None, None]
    image = Image2DModel.parse(rgb, dims=("c", "y", "x"), transformations={"B": Identity()}, chunks=256)
    sdata = SpatialData(images={"B_hne": image})
    stpred.pp.tile(sdata, size_um=50, mpp=1.0, min_tissue_fraction=1.0)
    meta = sdata.tables["B_tiles_table"].uns["stpred"]["tiles"]
    # 50 px per tile at full resolution: block means of 6 × 6 pixels (8 px per tile), ragged edges trimmed
    assert meta["level"] == 0
    assert meta["coarsen"] == 6
    assert meta["level_shape"] == [128, 168]
    assert meta["mask_scale"] == [6.0, 6.0]
    xy = sdata.tables["B_tiles_table"].obsm["spatial"]
    # every kept tile lies on the block (to one mask pixel), and the block is filled: (400/50 × 500/50) tiles
    assert (xy[:, 0] - 25 >= 250 - 6).all()
    assert (xy[:, 0] + 25 <= 750 + 6).all()
    assert (xy[:, 1] - 25 >= 200 - 6).all()
    assert (xy[:, 1] + 25 <= 600 + 6).all()
    assert len(xy) >= 7 * 9


def test_tile_copy_overwrite_and_write(sdata1: SpatialData, tmp_path: Path) -> None:
    from spatialdata import SpatialData

    before = _names(sdata1)
    out = stpred.pp.tile(sdata1, size_um=100, copy=True)
    assert _names(sdata1) == before
    assert "S0_tiles" in out.shapes
    assert out.images["S0_hne"] is sdata1.images["S0_hne"]
    stpred.pp.tile(sdata1, size_um=100)
    with pytest.raises(ValueError, match="overwrite=True"):
        stpred.pp.tile(sdata1, size_um=50)
    assert sdata1.tables["S0_tiles_table"].uns["stpred"]["tiles"]["size_um"] == 100
    with pytest.raises(ValueError, match="choose another name"):
        stpred.pp.tile(sdata1, size_um=50, key_added="S0_spots", overwrite=True)
    stpred.pp.tile(sdata1, size_um=50, overwrite=True)
    assert sdata1.tables["S0_tiles_table"].uns["stpred"]["tiles"]["size_um"] == 50
    small = SpatialData(
        shapes={"S0_tiles": sdata1.shapes["S0_tiles"]},
        labels={"S0_tiles_mask": sdata1.labels["S0_tiles_mask"]},
        tables={"S0_tiles_table": sdata1.tables["S0_tiles_table"]},
    )
    small.write(tmp_path / "tiles.zarr")
    back = SpatialData.read(tmp_path / "tiles.zarr")
    assert back.tables["S0_tiles_table"].uns["stpred"]["tiles"]["layout"] == "square"


# ------------------------------------------------------------------------------------------------- bad input
def test_tile_bad_input(sdata1: SpatialData) -> None:
    import spatialdata

    before = _names(sdata1)
    with pytest.raises(ValueError, match="at least 2 px"):
        stpred.pp.tile(sdata1, size_um=1.5, level=1)  # 0.75 px on level 1
    with pytest.raises(ValueError, match="at least 2 px"):
        stpred.pp.tile(sdata1, size_um=1.0)  # one pixel at full resolution
    with pytest.raises(ValueError, match="tissue=True"):
        stpred.pp.tile(sdata1, tissue=False, min_tissue_fraction=0.3)
    with pytest.raises(ValueError, match="layout"):
        stpred.pp.tile(sdata1, layout="hexagon")
    with pytest.raises(ValueError, match="size_um"):
        stpred.pp.tile(sdata1, size_um=-5)
    with pytest.raises(ValueError, match="smaller than one"):
        stpred.pp.tile(sdata1, size_um=5000)
    two = spatialdata.SpatialData(images={"a": sdata1.images["S0_hne"], "b": sdata1.images["S0_hne"]})
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*image_key="):
        stpred.pp.tile(two)
    with pytest.raises(KeyError, match="found"):
        stpred.pp.tile(sdata1, image_key="nope")
    with pytest.raises(ValueError, match="mpp="):
        stpred.pp.tile(two, image_key="a")
    assert _names(sdata1) == before
    assert _names(two) == {"images": ["a", "b"], "labels": [], "points": [], "shapes": [], "tables": []}


def test_tile_no_tissue() -> None:
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(1)
    glass = np.clip(240 + rng.normal(0, 3, (3, 600, 600)), 0, 255).astype(np.uint8)
    sdata = _image_sdata(glass, {"glass": Identity()})
    with pytest.raises(ValueError, match="No tissue detected.*tissue=False"):
        stpred.pp.tile(sdata, size_um=50, mpp=1.0)
    assert _names(sdata)["shapes"] == []
    assert _names(sdata)["tables"] == []
    assert _names(sdata)["labels"] == []
    stpred.pp.tile(sdata, size_um=50, mpp=1.0, tissue=False)
    assert sdata.tables["img_tiles_table"].n_obs == 12 * 12  # named after the image, not its coordinate system


def test_tile_other_image_types_detect_the_same_tissue() -> None:
    """16-bit and float scans find the tissue an 8-bit scan finds; images without colour are refused up front."""
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(3)
    rgb = np.clip(238 + rng.normal(0, 3, (3, 600, 600)), 0, 255)
    rgb[:, 150:450, 150:450] = rng.integers(60, 200, (3, 300, 300))
    rgb = rgb.astype(np.uint8)
    variants = {
        "uint8": rgb,
        "uint16": rgb.astype(np.uint16) * 257,
        "uint16_12bit": rgb.astype(np.uint16) * 16,
        "float01": rgb / 255.0,
        "rgba": np.concatenate([rgb, np.full((1, 600, 600), 255, np.uint8)]),
    }
    kept = {}
    for name, pixels in variants.items():
        sdata = _image_sdata(pixels, {"s": Identity()})
        stpred.pp.tile(sdata, size_um=50, mpp=1.0)
        kept[name] = sdata.tables["img_tiles_table"].obs["spot_id"].tolist()
    assert len(kept["uint8"]) == 36
    assert all(ids == kept["uint8"] for ids in kept.values()), {k: len(v) for k, v in kept.items()}

    for pixels in (rgb[:1], np.concatenate([rgb, rgb[:2]])):
        sdata = _image_sdata(pixels, {"s": Identity()})
        with pytest.raises(ValueError, match=r"RGB \(or RGBA\) H&E image.*tissue=False"):
            stpred.pp.tile(sdata, size_um=50, mpp=1.0)
        assert _names(sdata)["tables"] == []
        stpred.pp.tile(sdata, size_um=50, mpp=1.0, tissue=False)
        assert sdata.tables["img_tiles_table"].n_obs == 12 * 12


# ------------------------------------------------------------------------------------------------- plot
def test_pl_tissue(sdata1: SpatialData, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match="pp.tile"):
        tissue_data(sdata1)
    stpred.pp.tile(sdata1, size_um=100, layout="hex", stride_um=120)
    data = tissue_data(sdata1)
    table = sdata1.tables["S0_tiles_table"]
    assert data["key"] == "S0_tiles"
    assert data["image_key"] == "S0_hne"
    assert data["layout"] == "hex"
    np.testing.assert_allclose(data["xy"], table.obsm["spatial"])
    assert data["mask"] is not None
    assert data["mask"].shape == sdata1.labels["S0_tiles_mask"].shape
    assert data["mask_scale"][0] * data["mask"].shape[0] == pytest.approx(1920)
    assert data["size_px"] == 100
    assert data["bbox"] == (0.0, 0.0, 1920.0, 1920.0)
    fig = stpred.pl.tissue(sdata1, show=False, save=tmp_path / "t.png")
    assert isinstance(fig, Figure)
    assert (tmp_path / "t.png").stat().st_size > 0
    ax = fig.axes[0]
    assert any(len(c.get_offsets()) == table.n_obs for c in ax.collections)
    assert "S0" in ax.get_title()
    stpred.pp.tile(sdata1, size_um=100, key_added="other")
    with pytest.raises(ValueError, match="key="):
        tissue_data(sdata1)


# ------------------------------------------------------------------------------------------------- real HER2
@pytest.fixture(scope="module")
def her2_small(her2st_path: Path) -> tuple[SpatialData, float, np.ndarray]:
    """Section C2 decoded at 1/4 resolution (JPEG draft mode), with its µm/px and its spots under tissue."""
    import pandas as pd
    from PIL import Image
    from spatialdata.transformations import Identity

    from stpred.io._legacy_st import _grid_pitch, _no_pixel_limit

    spots = pd.read_csv(her2st_path / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    pitch_px, _layout = _grid_pitch(spots[["x", "y"]].to_numpy(), spots[["pixel_x", "pixel_y"]].to_numpy())
    path = next((her2st_path / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    with _no_pixel_limit(), Image.open(path) as im:
        full_w = im.size[0]
        im.draft("RGB", (im.size[0] // 4, im.size[1] // 4))
        rgb = np.moveaxis(np.asarray(im.convert("RGB")), -1, 0).copy()
    factor = full_w / rgb.shape[2]
    sdata = _image_sdata(rgb, {"C2": Identity()}, key="C2_hne")
    mpp = 200.0 / pitch_px * factor
    xy_spots = spots[["pixel_x", "pixel_y"]].to_numpy() / factor
    return sdata, mpp, xy_spots


@pytest.mark.her2st
def test_tile_her2_no_glass(her2_small: tuple) -> None:
    import spatialdata

    base, mpp, xy_spots = her2_small
    sdata = spatialdata.SpatialData(images=dict(base.images))
    stpred.pp.tile(sdata, size_um=100, mpp=mpp)
    table = sdata.tables["C2_tiles_table"]
    xy = table.obsm["spatial"]
    _, h, w = sdata.images["C2_hne"]["scale0"]["image"].shape
    # the background corners (a fifth of each side) get no tile
    for cx, cy in ((0, 0), (w, 0), (0, h), (w, h)):
        near = (np.abs(xy[:, 0] - cx) < w / 5) & (np.abs(xy[:, 1] - cy) < h / 5)
        assert not near.any()
    # every tile is close to the ST spots under tissue (100 µm spots on a 200 µm grid) ...
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy_spots).query(xy)
    assert (d * mpp < 400).all()
    # ... and the spots under tissue are covered by tiles
    half = 50.0 / mpp
    covered = [(np.abs(xy - s) <= half).all(axis=1).any() for s in xy_spots]
    assert np.mean(covered) > 0.9
    # the full grid is much larger: glass was left out
    assert table.n_obs < 0.4 * table.uns["stpred"]["tiles"]["n_grid"]


@pytest.mark.her2st
def test_tile_her2_centres_in_mask_hex(her2_small: tuple) -> None:
    import spatialdata

    base, mpp, _ = her2_small
    sdata = spatialdata.SpatialData(images=dict(base.images))
    stpred.pp.tile(sdata, size_um=55, stride_um=100, layout="hex", min_tissue_fraction=1.0, mpp=mpp)
    table = sdata.tables["C2_tiles_table"]
    mask = np.asarray(sdata.labels["C2_tiles_mask"].data)
    _, h, w = sdata.images["C2_hne"]["scale0"]["image"].shape
    xy = table.obsm["spatial"]
    assert (mask[(xy[:, 1] * mask.shape[0] / h).astype(int), (xy[:, 0] * mask.shape[1] / w).astype(int)] > 0).all()
    np.testing.assert_allclose(np.median(_nn_distances(table.obs[["x_um", "y_um"]].to_numpy())), 100.0)
    assert table.uns["stpred"]["tiles"]["level"] > 0  # detection ran on a coarse level
