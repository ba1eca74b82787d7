"""Readers for instrument output beyond Visium: legacy-ST array geometry, Visium HD bins, Xenium pseudo-spots."""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stpred

if TYPE_CHECKING:
    from pathlib import Path


# ---------------------------------------------------------------------------------------------------------------------
# legacy ST: square vs checkerboard arrays
# ---------------------------------------------------------------------------------------------------------------------
def _write_st(root: Path, array_xy: np.ndarray, pixel_xy: np.ndarray, *, size: int = 400) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(rng.integers(0, 5, (len(ids), 3)), index=ids, columns=["A", "B", "C"])
    with gzip.open(root / "counts.tsv.gz", "wt") as fh:
        fh.write(counts.to_csv(sep="\t"))
    spots = pd.DataFrame({"x": array_xy[:, 0], "y": array_xy[:, 1], "pixel_x": pixel_xy[:, 0], "pixel_y": pixel_xy[:, 1]})
    spots.to_csv(root / "spots.tsv", sep="\t", index=False)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "he.png")
    return [root / "counts.tsv.gz", root / "spots.tsv", root / "he.png"]


def _lattice(n: int, *, checkerboard: bool, step_px: float) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(1, n + 1), np.arange(1, n + 1))
    array_xy = np.c_[xs.ravel(), ys.ravel()]
    if checkerboard:
        array_xy = array_xy[(array_xy.sum(axis=1) % 2) == 0]
    array_xy = array_xy[1:]  # one spot missing, as under real tissue
    return array_xy, 10.0 + array_xy * step_px


@pytest.mark.parametrize("checkerboard", [False, True])
def test_legacy_st_geometry_is_detected(tmp_path, checkerboard):
    # nearest neighbours 40 px apart in both layouts: 200 µm / 40 px = 5 µm/px
    step = 40.0 / np.sqrt(2) if checkerboard else 40.0
    array_xy, pixel_xy = _lattice(8, checkerboard=checkerboard, step_px=step)
    paths = _write_st(tmp_path, array_xy, pixel_xy)
    sdata = stpred.io.read_legacy_st(*paths, section="T")
    uns = sdata.tables["table"].uns["stpred"]
    assert uns["geometry"] == {"T": "checkerboard" if checkerboard else "square"}
    assert uns["mpp"]["T"] == pytest.approx(5.0)
    np.testing.assert_allclose(sdata.shapes["T_spots"]["radius"], 10.0)  # 100 µm spots: 20 px wide


def test_legacy_st_spot_pitch_override_and_implausible_scale_warning(tmp_path):
    array_xy, pixel_xy = _lattice(6, checkerboard=False, step_px=40.0)
    paths = _write_st(tmp_path, array_xy, pixel_xy)
    sdata = stpred.io.read_legacy_st(*paths, section="T", spot_pitch_um=100)
    uns = sdata.tables["table"].uns["stpred"]
    assert uns["mpp"]["T"] == pytest.approx(2.5)
    assert uns["pitch_um"]["T"] == 100.0
    np.testing.assert_allclose(sdata.shapes["T_spots"]["radius"], 20.0)  # 100 µm spots at 2.5 µm/px
    with pytest.warns(UserWarning, match=r"estimated 20 µm/px .* outside the plausible 0.1–10.0 µm/px .*spot_pitch_um="):
        stpred.io.read_legacy_st(*paths, section="T", spot_pitch_um=800)
    with pytest.raises(ValueError, match="Expected `spot_pitch_um` to be a positive number"):
        stpred.io.read_legacy_st(*paths, section="T", spot_pitch_um=0)


# ---------------------------------------------------------------------------------------------------------------------
# Xenium: a SpatialData with the element layout of spatialdata_io.xenium, built in memory
# ---------------------------------------------------------------------------------------------------------------------
PIXEL_SIZE = 0.5  # µm per morphology pixel
ALIGNMENT = np.array([[2.0, 0.0, 10.0], [0.0, 2.0, 20.0], [0.0, 0.0, 1.0]])  # H&E pixels -> morphology pixels


def _xenium_like(*, he: bool = True, morphology: bool = False, n_cells: int = 300):
    import anndata as ad
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity, Scale

    rng = np.random.default_rng(1)
    xy = np.c_[rng.uniform(0, 300, n_cells), rng.uniform(0, 200, n_cells)]  # µm
    ids = [f"cell{i:04d}" for i in range(n_cells)]
    counts = sparse.random(n_cells, 5, density=0.5, random_state=1, format="csr", data_rvs=lambda k: rng.integers(1, 9, k))
    table = ad.AnnData(
        X=counts.astype(np.float32),
        obs=pd.DataFrame({"cell_id": ids, "region": pd.Categorical(["cell_circles"] * n_cells)}, index=ids),
        var=pd.DataFrame({"gene_ids": [f"ENSG{i}" for i in range(5)]}, index=["EPCAM", "KRT8", "PTPRC", "ACTA2", "MKI67"]),
    )
    table.obsm["spatial"] = xy
    table = TableModel.parse(table, region="cell_circles", region_key="region", instance_key="cell_id")
    circles = ShapesModel.parse(
        xy, geometry=0, radius=np.full(n_cells, 5.0), index=pd.Index(ids, name="cell_id"),
        transformations={"global": Scale([1 / PIXEL_SIZE, 1 / PIXEL_SIZE], axes=("x", "y"))},
    )
    images = {}
    if he:
        pixels = rng.integers(0, 256, (3, 200, 300), dtype=np.uint8)
        images["he_image"] = Image2DModel.parse(
            pixels, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
            transformations={"global": Affine(ALIGNMENT, input_axes=("x", "y"), output_axes=("x", "y"))},
        )
    if morphology:
        dapi = rng.integers(0, 4000, (4, 400, 600), dtype=np.uint16)
        images["morphology_focus"] = Image2DModel.parse(
            dapi, dims=("c", "y", "x"), scale_factors=[2], transformations={"global": Identity()}
        )
    return SpatialData(images=images, shapes={"cell_circles": circles}, tables={"table": table}), xy, counts


def _expected_pool(xy: np.ndarray, counts, size: float) -> pd.DataFrame:
    origin = xy.min(axis=0)
    grid = np.floor((xy - origin) / size).astype(int)
    frame = pd.DataFrame(counts.toarray(), index=[f"X_{x}x{y}" for x, y in grid])
    return frame.groupby(level=0).sum()


def test_xenium_pseudospots_pool_cells_onto_the_aligned_he(assert_contract):
    cells, xy, counts = _xenium_like()
    sdata = stpred.io.xenium_pseudospots(cells, spot_size_um=100, section="X")
    assert_contract(sdata)
    table = sdata.tables["table"]
    expected = _expected_pool(xy, counts, 100.0)
    assert sorted(table.obs_names) == sorted(expected.index)
    np.testing.assert_array_equal(table.X.toarray(), expected.loc[table.obs_names].to_numpy())
    assert table.obs["n_cells"].sum() == len(xy)
    assert table.var_names.tolist() == ["EPCAM", "KRT8", "PTPRC", "ACTA2", "MKI67"]
    assert table.var["gene_ids"].tolist()[0] == "ENSG0"
    # square centres (µm) -> morphology px (÷ 0.5) -> H&E px (inverse alignment)
    origin = xy.min(axis=0)
    centres_um = origin + (table.obs[["array_x", "array_y"]].to_numpy() + 0.5) * 100.0
    expected_px = (centres_um / PIXEL_SIZE - ALIGNMENT[:2, 2]) / 2.0
    np.testing.assert_allclose(table.obsm["spatial"], expected_px)
    uns = table.uns["stpred"]
    assert uns["mpp"]["X"] == pytest.approx(1.0)  # 0.5 µm morphology pixels, H&E pixels twice as large
    assert uns["pitch_um"]["X"] == uns["spot_diameter_um"]["X"] == 100.0
    assert uns["technology"]["X"] == "xenium"
    assert uns["image"] == {"X": "he_image"}
    np.testing.assert_allclose(sdata.shapes["X_spots"]["radius"], 50.0)
    np.testing.assert_array_equal(
        sdata.images["X_hne"]["scale0"]["image"].values, cells.images["he_image"].values
    )
    # the user's object is untouched
    assert sorted(cells.images) == ["he_image"]
    assert cells.tables["table"].n_obs == len(xy)


def test_xenium_pseudospots_size_and_min_cells():
    cells, xy, counts = _xenium_like()
    small = stpred.io.xenium_pseudospots(cells, spot_size_um=50, section="X").tables["table"]
    expected = _expected_pool(xy, counts, 50.0)
    assert small.n_obs == len(expected)
    dense = stpred.io.xenium_pseudospots(cells, spot_size_um=50, section="X", min_cells=3).tables["table"]
    assert (dense.obs["n_cells"] >= 3).all()
    assert dense.n_obs == int((small.obs["n_cells"] >= 3).sum())


def test_xenium_pseudospots_morphology_fallback_is_grey_rgb():
    cells, _, _ = _xenium_like(he=False, morphology=True)
    with pytest.warns(UserWarning, match="not an 8-bit RGB H&E image"):
        sdata = stpred.io.xenium_pseudospots(cells, section="X")
    image = sdata.images["X_hne"]["scale0"]["image"]
    assert image.shape == (3, 400, 600)
    assert image.dtype == np.uint8
    assert sdata.tables["table"].uns["stpred"]["mpp"]["X"] == pytest.approx(PIXEL_SIZE)


def test_xenium_pseudospots_bad_input_leaves_object_unchanged():
    cells, _, _ = _xenium_like()
    table = cells.tables["table"]
    del table.obsm["spatial"]
    with pytest.raises(ValueError, match=r"table 'table' has no cell centroids: expected `obsm\['spatial'\]`"):
        stpred.io.xenium_pseudospots(cells, section="X")
    assert "spatial" not in table.obsm
    assert sorted(cells.images) == ["he_image"]
    cells, _, _ = _xenium_like()
    del cells.shapes["cell_circles"]
    with pytest.raises(ValueError, match=r"Pass `pixel_size_um=`"):
        stpred.io.xenium_pseudospots(cells, section="X")
    with pytest.raises(KeyError, match=r"No image 'he' in `sdata.images`"):
        stpred.io.xenium_pseudospots(cells, section="X", image_key="he", pixel_size_um=PIXEL_SIZE)
    with pytest.raises(ValueError, match="Expected `spot_size_um` to be a positive number"):
        stpred.io.xenium_pseudospots(cells, spot_size_um=0, pixel_size_um=PIXEL_SIZE)


def _write_xenium(root: Path, *, he: bool = True) -> dict:
    """A Xenium output folder as spatialdata_io.xenium reads it (analyzer 1.0: no cell-id array in cells.zarr.zip)."""
    import json

    import tifffile
    import zarr

    cells, xy, counts = _xenium_like(he=False)
    table = cells.tables["table"]
    root.mkdir(parents=True)
    (root / "experiment.xenium").write_text(json.dumps({"pixel_size": PIXEL_SIZE, "analysis_sw_version": "xenium-1.0.2"}))
    ids = table.obs_names.tolist()
    _write_10x_h5(root / "cell_feature_matrix.h5", counts.toarray(), ids, table.var_names.tolist(), table.var["gene_ids"].tolist())
    pd.DataFrame(
        {"cell_id": ids, "x_centroid": xy[:, 0], "y_centroid": xy[:, 1], "transcript_counts": np.asarray(counts.sum(axis=1)).ravel(),
         "cell_area": np.full(len(ids), 50.0), "nucleus_area": np.full(len(ids), 20.0)}
    ).to_parquet(root / "cells.parquet", index=False)
    store = zarr.storage.ZipStore(root / "cells.zarr.zip", mode="w")
    zarr.open_group(store, mode="w", zarr_format=2)
    store.close()
    rng = np.random.default_rng(4)
    tifffile.imwrite(root / "morphology_focus.ome.tif", rng.integers(0, 4000, (400, 600), dtype=np.uint16))
    pixels = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    if he:
        tifffile.imwrite(root / "X_he_image.ome.tif", pixels)
        np.savetxt(root / "X_he_imagealignment.csv", ALIGNMENT, delimiter=",")
    return {"xy": xy, "counts": counts, "he": pixels}


def test_read_xenium_folder_with_aligned_he(tmp_path, assert_contract):
    truth = _write_xenium(tmp_path / "X")
    sdata = stpred.io.read_xenium(tmp_path / "X")  # finds X_he_image.ome.tif and X_he_imagealignment.csv (10x names)
    assert_contract(sdata)
    table = sdata.tables["table"]
    expected = _expected_pool(truth["xy"], truth["counts"], 100.0)
    np.testing.assert_array_equal(table.X.toarray(), expected.loc[table.obs_names].to_numpy())
    assert table.uns["stpred"]["mpp"]["X"] == pytest.approx(1.0)
    assert table.uns["stpred"]["image"] == {"X": "he_image"}
    np.testing.assert_array_equal(sdata.images["X_hne"]["scale0"]["image"].values, np.moveaxis(truth["he"], -1, 0))
    origin = truth["xy"].min(axis=0)
    centres_um = origin + (table.obs[["array_x", "array_y"]].to_numpy() + 0.5) * 100.0
    np.testing.assert_allclose(table.obsm["spatial"], (centres_um / PIXEL_SIZE - ALIGNMENT[:2, 2]) / 2.0)
    # the same files named explicitly give the same object
    named = stpred.io.read_xenium(
        tmp_path / "X", he_image_file="X_he_image.ome.tif", alignment_file="X_he_imagealignment.csv"
    ).tables["table"]
    np.testing.assert_allclose(named.obsm["spatial"], table.obsm["spatial"])
    with pytest.raises(FileNotFoundError, match="The alignment file .*missing.csv' does not exist"):
        stpred.io.read_xenium(tmp_path / "X", he_image_file="X_he_image.ome.tif", alignment_file="missing.csv")
    with pytest.raises(FileNotFoundError, match="No 'experiment.xenium'"):
        stpred.io.read_xenium(tmp_path)
    # an H&E found without its alignment CSV is assumed registered, with a warning
    (tmp_path / "X" / "X_he_imagealignment.csv").unlink()
    with pytest.warns(UserWarning, match="no alignment CSV"), pytest.warns(UserWarning, match="outside the image"):
        stpred.io.read_xenium(tmp_path / "X")


def test_read_xenium_folder_without_he_uses_morphology(tmp_path):
    _write_xenium(tmp_path / "X", he=False)
    with pytest.warns(UserWarning, match="not an 8-bit RGB H&E image"):
        sdata = stpred.io.read_xenium(tmp_path / "X", spot_size_um=50)
    table = sdata.tables["table"]
    assert table.uns["stpred"]["image"] == {"X": "morphology_focus"}
    assert table.uns["stpred"]["mpp"]["X"] == pytest.approx(PIXEL_SIZE)
    assert table.uns["stpred"]["pitch_um"]["X"] == 50.0


# ---------------------------------------------------------------------------------------------------------------------
# Visium HD: a tiny Space Ranger folder with 8 and 16 µm bins, as spatialdata_io.visium_hd reads it
# ---------------------------------------------------------------------------------------------------------------------
HD_MPP = 0.5  # µm per full-resolution pixel
HD_HIRES = 0.5  # tissue_hires_scalef


def _write_10x_h5(path: Path, counts, barcodes: list[str], genes: list[str], ids: list[str]) -> None:
    import h5py
    from scipy import sparse

    matrix = sparse.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix")
        group["barcodes"] = np.array(barcodes, dtype="S")
        group["data"] = matrix.data.astype(np.int32)
        group["indices"] = matrix.indices.astype(np.int64)
        group["indptr"] = matrix.indptr.astype(np.int64)
        group["shape"] = np.array(matrix.shape, dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array(ids, dtype="S")
        features["name"] = np.array(genes, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])


def _write_visium_hd(root: Path, *, sizes=(8, 16), side_um: int = 80) -> dict:
    import json

    import h5py

    rng = np.random.default_rng(3)
    (root / "spatial").mkdir(parents=True)
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    full = int(side_um / HD_MPP) + 40
    image = rng.integers(0, 256, (full, full, 3), dtype=np.uint8)
    Image.fromarray(image[:: int(1 / HD_HIRES), :: int(1 / HD_HIRES)]).save(root / "spatial" / "tissue_hires_image.png")
    Image.fromarray(image[::8, ::8]).save(root / "spatial" / "tissue_lowres_image.png")
    genes, ids = ["EPCAM", "KRT8", "MT-CO1", "KRT8", "ACTB"], [f"ENSG{i}" for i in range(5)]
    truth = {"image": image}
    for size in sizes:
        n_side = side_um // size
        rows, cols = np.divmod(np.arange(n_side * n_side), n_side)
        barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)]
        counts = rng.integers(0, 4, (len(barcodes), len(genes)))
        folder = root / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, genes, ids)
        px = size / HD_MPP
        positions = pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": np.ones(len(barcodes), dtype=np.int32),
                "array_row": rows,
                "array_col": cols,
                "pxl_row_in_fullres": 20 + (rows + 0.5) * px,
                "pxl_col_in_fullres": 20 + (cols + 0.5) * px,
            }
        )
        positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        scalefactors = {
            "spot_diameter_fullres": size / HD_MPP,
            "bin_size_um": float(size),
            "microns_per_pixel": HD_MPP,
            "tissue_hires_scalef": HD_HIRES,
            "tissue_lowres_scalef": 0.125,
            "fiducial_diameter_fullres": 100.0,
            "regist_target_img_scalef": HD_HIRES,
        }
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
        if size == sizes[0]:
            (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
        truth[size] = {"counts": counts, "barcodes": barcodes, "xy": positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()}
    return truth


@pytest.fixture(scope="module")
def hd_folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hd") / "HD1"
    return root, _write_visium_hd(root)


@pytest.mark.filterwarnings("ignore:`load_segmentations_only`:FutureWarning")
@pytest.mark.parametrize("size", [8, 16])
def test_read_visium_hd_bins_are_spots(hd_folder, size, assert_contract):
    root, truth = hd_folder
    sdata = stpred.io.read_visium_hd(root, bin_size=size)
    assert_contract(sdata)
    table = sdata.tables["table"]
    assert table.obs_names.tolist() == [f"HD1_{b}" for b in truth[size]["barcodes"]]
    np.testing.assert_array_equal(table.X.toarray(), truth[size]["counts"])
    assert table.var_names.tolist() == ["EPCAM", "KRT8", "MT-CO1", "KRT8-1", "ACTB"]
    assert table.var["gene_ids"].tolist() == [f"ENSG{i}" for i in range(5)]
    np.testing.assert_allclose(table.obsm["spatial"], truth[size]["xy"] * HD_HIRES)
    uns = table.uns["stpred"]
    assert uns["mpp"]["HD1"] == pytest.approx(HD_MPP / HD_HIRES)
    assert uns["pitch_um"]["HD1"] == uns["spot_diameter_um"]["HD1"] == size
    assert uns["technology"]["HD1"] == "visium_hd"
    assert uns["image"] == {"HD1": "hires"}
    assert uns["spot_shape"] == {"HD1": "square"}
    # a bin of `size` µm is `size / mpp` hires pixels wide
    np.testing.assert_allclose(sdata.shapes["HD1_spots"]["radius"], size / (HD_MPP / HD_HIRES) / 2)


@pytest.mark.filterwarnings("ignore:`load_segmentations_only`:FutureWarning")
def test_visium_hd_bins_run_through_pp(hd_folder):
    root, truth = hd_folder
    sdata = stpred.io.read_visium_hd(root, bin_size=8, section="B")
    stpred.pp.select_genes(sdata, n_top=3, exclude="MT-")
    assert "MT-CO1" not in sdata.tables["stpred"].var_names
    stpred.pp.normalize(sdata)
    bank = stpred.pp.extract_patches(sdata, size=8, context_size=None, progress=False)
    assert bank.spot.shape == (100, 3, 8, 8)
    # the crop of the first bin is the hires image around its centre
    hires = np.asarray(Image.open(root / "spatial" / "tissue_hires_image.png"))
    cx, cy = np.floor(sdata.tables["stpred"].obsm["spatial"][0]).astype(int)
    np.testing.assert_array_equal(bank.spot[0], np.moveaxis(hires[cy - 4 : cy + 4, cx - 4 : cx + 4], -1, 0))


def test_read_visium_hd_unknown_bin_size_lists_the_available_ones(hd_folder, tmp_path):
    root, _ = hd_folder
    with pytest.raises(ValueError, match=r"No 2 µm bins in .*: the run has bin sizes \[8, 16\] µm. Pass one of them"):
        stpred.io.read_visium_hd(root, bin_size=2)
    with pytest.raises(TypeError, match="Expected `bin_size` to be an int"):
        stpred.io.read_visium_hd(root, bin_size="8")
    with pytest.raises(FileNotFoundError, match="No bin folders"):
        stpred.io.read_visium_hd(tmp_path)
