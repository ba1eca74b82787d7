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

PITCH = 16  # pixels between neighbouring spots of the tiny legacy-ST section

# the tiny sections have 12.5 µm/px (16 px per 200 µm): the reader rightly warns that this is implausible for a scan
pytestmark = pytest.mark.filterwarnings("ignore:Section .* outside the plausible:UserWarning")
GENES = ["A", "B", "C", "D"]


def _write_legacy(
    folder: Path,
    *,
    section: str = "T1",
    genes: list[str] | None = None,
    image_mode: str = "RGB",
    image_suffix: str = ".png",
    r_style_header: bool = False,
    seed: int = 0,
) -> dict[str, Path]:
    """A 64×64 px legacy-ST section: a 3×3 spot grid, one unselected spot, one spot missing from each file."""
    folder.mkdir(parents=True, exist_ok=True)
    genes = GENES if genes is None else genes
    rng = np.random.default_rng(seed)
    grid = [(x, y) for y in (1, 2, 3) for x in (1, 2, 3)]
    spots = pd.DataFrame(
        {
            "x": [x for x, _ in grid] + [9],  # (9, 9) has no count row
            "y": [y for _, y in grid] + [9],
            "pixel_x": [8.0 + PITCH * (x - 1) + 0.3 for x, _ in grid] + [60.0],
            "pixel_y": [10.0 + PITCH * (y - 1) - 0.2 for _, y in grid] + [60.0],
            "selected": [1, 1, 1, 1, 0, 1, 1, 1, 1, 1],  # (2, 2) is not under tissue
        }
    )
    spots.insert(2, "new_x", spots["x"] + 0.01)
    spots.insert(3, "new_y", spots["y"] - 0.01)
    ids = [f"{x}x{y}" for x, y in grid if (x, y) != (3, 3)] + ["7x7"]  # 3x3 has no spot row, 7x7 no position
    counts = pd.DataFrame(rng.integers(0, 20, (len(ids), len(genes))), index=ids, columns=genes)
    paths = {
        "counts": folder / f"{section}.tsv.gz",
        "spots": folder / f"{section}_selection.tsv",
        "image": folder / f"{section}{image_suffix}",
    }
    text = counts.to_csv(sep="\t")
    if r_style_header:  # header without a field for the spot-id column (as R's write.table writes it)
        lines = text.splitlines(keepends=True)
        text = lines[0].removeprefix("\t") + "".join(lines[1:])
    with gzip.open(paths["counts"], "wt") as fh:
        fh.write(text)
    spots.to_csv(paths["spots"], sep="\t", index=False)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if image_suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(paths["image"], pixels)
    else:
        Image.fromarray(pixels).convert(image_mode).save(paths["image"])
    return paths


def _read(paths: dict[str, Path], **kwargs):
    kwargs.setdefault("section", "T1")
    return stpred.io.read_legacy_st(paths["counts"], paths["spots"], paths["image"], **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# read_legacy_st on a tiny section
# ---------------------------------------------------------------------------------------------------------------------
def test_read_legacy_st_tiny(tmp_path, assert_contract):
    paths = _write_legacy(tmp_path)
    sdata = _read(paths, patient="P7")
    assert_contract(sdata)
    table = sdata.tables["table"]
    # kept: in both files and selected -> the grid minus 2x2 (unselected) and 3x3 (no spot row)
    expected = [f"{x}x{y}" for y in (1, 2, 3) for x in (1, 2, 3) if (x, y) not in {(2, 2), (3, 3)}]
    assert table.obs_names.tolist() == [f"T1_{s}" for s in expected]
    assert table.var_names.tolist() == GENES
    counts = pd.read_csv(paths["counts"], sep="\t", index_col=0)
    np.testing.assert_array_equal(table.X.toarray(), counts.loc[expected].to_numpy(dtype=np.float32))
    spots = pd.read_csv(paths["spots"], sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    np.testing.assert_allclose(table.obsm["spatial"], spots.loc[expected, ["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(table.obs[["array_x", "array_y"]], spots.loc[expected, ["x", "y"]])
    assert set(table.obs["patient"]) == {"P7"}
    uns = table.uns["stpred"]
    assert uns["mpp"]["T1"] == pytest.approx(200.0 / PITCH)
    assert uns["technology"]["T1"] == "legacy_st"
    assert uns["pitch_um"]["T1"] == 200.0
    assert uns["spot_diameter_um"]["T1"] == 100.0
    np.testing.assert_allclose(sdata.shapes["T1_spots"]["radius"], PITCH / 4)
    image = sdata.images["T1_hne"]["scale0"]["image"].values
    np.testing.assert_array_equal(image, np.moveaxis(np.asarray(Image.open(paths["image"])), -1, 0))


def test_read_legacy_st_patient_defaults_to_section(tmp_path):
    table = _read(_write_legacy(tmp_path)).tables["table"]
    assert set(table.obs["patient"]) == {"T1"}


@pytest.mark.parametrize("variant", [{"image_suffix": ".tif"}, {"r_style_header": True}])
def test_read_legacy_st_variants_read_the_same(tmp_path, variant):
    reference = _read(_write_legacy(tmp_path / "ref")).tables["table"]
    other = _read(_write_legacy(tmp_path / "other", **variant))
    np.testing.assert_array_equal(other.tables["table"].X.toarray(), reference.X.toarray())
    assert other.tables["table"].var_names.tolist() == GENES
    assert other.images["T1_hne"]["scale0"]["image"].shape == (3, 64, 64)


def test_read_legacy_st_rgba_drops_alpha(tmp_path):
    paths = _write_legacy(tmp_path, image_mode="RGBA")
    with pytest.warns(UserWarning, match="alpha channel; it is dropped"):
        sdata = _read(paths)
    image = sdata.images["T1_hne"]["scale0"]["image"].values
    np.testing.assert_array_equal(image, np.moveaxis(np.asarray(Image.open(paths["image"]))[..., :3], -1, 0))


def test_read_legacy_st_duplicate_genes_are_summed(tmp_path):
    paths = _write_legacy(tmp_path, genes=["A", "B", "A", "C"])
    raw = pd.read_csv(paths["counts"], sep="\t", index_col=0).to_numpy()  # pandas renames the 2nd A to "A.1"
    with pytest.warns(UserWarning, match=r"1 duplicated gene name\(s\) \(first: \['A'\]\); their counts are summed"):
        table = _read(paths).tables["table"]
    assert table.var_names.tolist() == ["A", "B", "C"]
    rows = [0, 1, 2, 3, 5, 6, 7]  # count rows kept (not 2x2 at row 4, nor 7x7 at row 8)
    np.testing.assert_array_equal(table.X.toarray()[:, 0], raw[rows, 0] + raw[rows, 2])
    np.testing.assert_array_equal(table.X.toarray()[:, 2], raw[rows, 3])


def _edit_counts(path: Path, edit) -> None:
    frame = pd.read_csv(path, sep="\t", index_col=0)
    frame = edit(frame)
    with gzip.open(path, "wt") as fh:
        fh.write(frame.to_csv(sep="\t"))


def _edit_spots(path: Path, edit) -> None:
    edit(pd.read_csv(path, sep="\t")).to_csv(path, sep="\t", index=False)


def _nan(frame):
    frame = frame.astype(float)
    frame.iloc[1, 2] = np.nan
    return frame


def _negative(frame):
    frame.iloc[0, 0] = -3
    return frame


def _text(frame):
    frame = frame.astype(object)
    frame.iloc[0, 1] = "many"
    return frame


def _outside(frame):
    frame.loc[0, "pixel_x"] = 80.0
    return frame


def _one_line(frame):
    return frame[frame["y"] == 1]


def _unselected(frame):
    frame["selected"] = 0
    return frame


@pytest.mark.parametrize(
    ("which", "edit", "match"),
    [
        ("counts", _nan, r"1 missing \(NaN\) count\(s\), e.g. spot '2x1', gene 'C'"),
        ("counts", _negative, r"1 negative count\(s\), e.g. spot '1x1', gene 'A'. Pass raw"),
        ("counts", _text, r"non-numeric values in gene column\(s\) \['B'\]"),
        ("counts", lambda f: pd.concat([f, f.iloc[:1]]), r"duplicate spot ids \['1x1'\]"),
        ("counts", lambda f: f.rename(index=lambda s: f"spot_{s}"), "No spot of section 'T1' is left after matching"),
        ("spots", lambda f: f.drop(columns=["pixel_x"]), r"lacks the column\(s\) \['pixel_x'\]; found \['x', 'y'"),
        ("spots", lambda f: pd.concat([f, f.iloc[:1]]), r"lists the array position\(s\) \['1x1'\] more than once"),
        ("spots", _outside, r"1 spot centre\(s\) lie outside the 64×64 image .* spot '1x1' at \(80.0, 9.8\)"),
        ("spots", _unselected, "No spot of section 'T1' is left"),
        ("spots", _one_line, r"Cannot estimate the spot pitch from 3 spot\(s\) on one line"),
        ("spots", lambda f: f.assign(x=f["x"] + 0.5), "non-integer `x`/`y` array coordinates"),
        ("spots", lambda f: f.assign(pixel_y=np.nan), r"missing or non-numeric values in \['pixel_y'\]"),
    ],
)
def test_read_legacy_st_bad_tables(tmp_path, which, edit, match):
    paths = _write_legacy(tmp_path)
    (_edit_counts if which == "counts" else _edit_spots)(paths[which], edit)
    with pytest.raises(ValueError, match=match):
        _read(paths)


def test_read_legacy_st_header_mismatch(tmp_path):
    paths = _write_legacy(tmp_path)
    with gzip.open(paths["counts"], "wt") as fh:
        fh.write("\tA\tB\n1x1\t1\t2\t3\t4\n")
    with pytest.raises(ValueError, match="has 3 header fields but 5 fields in its first row"):
        _read(paths)


@pytest.mark.parametrize("which", ["counts", "spots", "image"])
def test_read_legacy_st_missing_file(tmp_path, which):
    paths = _write_legacy(tmp_path)
    paths[which].unlink()
    what = {"counts": "counts", "spots": "spot", "image": "image"}[which]
    with pytest.raises(FileNotFoundError, match=rf"The {what} file '.*' does not exist"):
        _read(paths)


@pytest.mark.parametrize(("mode", "name"), [("L", "grey"), ("P", "palette")])
def test_read_legacy_st_non_rgb_image(tmp_path, mode, name):
    paths = _write_legacy(tmp_path, image_mode=mode)
    with pytest.raises(ValueError, match=rf"has mode '{mode}' \({name}\); expected RGB. Convert it to 8-bit RGB"):
        _read(paths)


def test_read_legacy_st_bad_image_files(tmp_path):
    import tifffile

    paths = _write_legacy(tmp_path)
    paths["image"].write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read the image"):
        _read(paths)
    paths["image"] = tmp_path / "deep.tif"
    tifffile.imwrite(paths["image"], np.zeros((64, 64, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="has uint16 pixels; expected 8-bit RGB"):
        _read(paths)
    tifffile.imwrite(paths["image"], np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"has shape \(64, 64\); expected an RGB image"):
        _read(paths)


def test_read_legacy_st_bad_section(tmp_path):
    with pytest.raises(ValueError, match="Expected `section` to be a non-empty string, found ''"):
        _read(_write_legacy(tmp_path), section="")


# ---------------------------------------------------------------------------------------------------------------------
# concat
# ---------------------------------------------------------------------------------------------------------------------
def test_concat_union_of_genes(tmp_path, assert_contract):
    a = _read(_write_legacy(tmp_path / "a"), section="A", patient="P")
    b = _read(_write_legacy(tmp_path / "b", genes=["C", "E", "A"], seed=1), section="B", patient="Q")
    xa, xb = a.tables["table"].to_df(), b.tables["table"].to_df()
    sdata = stpred.io.concat([a, b])
    assert_contract(sdata)
    table = sdata.tables["table"]
    assert table.var_names.tolist() == ["A", "B", "C", "D", "E"]
    assert table.var["present_A"].tolist() == [True, True, True, True, False]
    assert table.var["present_B"].tolist() == [True, False, True, False, True]
    genes_in_all = table.var_names[table.var.filter(like="present_").all(axis=1)].tolist()
    assert genes_in_all == ["A", "C"]
    expected = pd.concat([xa, xb]).fillna(0.0)[table.var_names]
    np.testing.assert_array_equal(table.X.toarray(), expected.to_numpy())
    assert table.obs_names.tolist() == [*xa.index, *xb.index]
    assert list(table.obs["section"].cat.categories) == ["A", "B"]
    assert list(table.obs["patient"].cat.categories) == ["P", "Q"]
    assert sorted(table.uns["stpred"]["mpp"]) == ["A", "B"]
    assert sorted(sdata.images) == ["A_hne", "B_hne"]
    # a concatenated object can be concatenated again
    c = _read(_write_legacy(tmp_path / "c"), section="C")
    again = stpred.io.concat([sdata, c])
    assert_contract(again)
    assert again.tables["table"].var["present_B"].tolist() == [True, False, True, False, True]
    assert again.tables["table"].var["present_C"].tolist() == [True, True, True, True, False]


def test_concat_errors(tmp_path):
    a = _read(_write_legacy(tmp_path / "a"), section="A")
    with pytest.raises(ValueError, match=r"Section names must be unique .* found \['A'\] more than once"):
        stpred.io.concat([a, _read(_write_legacy(tmp_path / "b"), section="A")])
    with pytest.raises(TypeError, match="Expected a list of SpatialData objects, found SpatialData"):
        stpred.io.concat(a)
    with pytest.raises(ValueError, match="Expected at least one SpatialData object"):
        stpred.io.concat([])
    with pytest.raises(TypeError, match="found AnnData at position 1"):
        stpred.io.concat([a, a.tables["table"]])
    a.tables["stpred"] = a.tables["table"].copy()
    with pytest.raises(ValueError, match=r"has tables \['stpred', 'table'\]; `concat` combines raw sections"):
        stpred.io.concat([a])


def test_zarr_round_trip_tiny(tmp_path):
    import spatialdata as sd

    sdata = stpred.io.concat(
        [_read(_write_legacy(tmp_path / "a"), section="A"), _read(_write_legacy(tmp_path / "b"), section="B")]
    )
    sdata.write(tmp_path / "x.zarr")
    back = sd.read_zarr(tmp_path / "x.zarr")
    _assert_same(sdata, back)


def _assert_same(sdata, back) -> None:
    from spatialdata.transformations import get_transformation

    assert sorted(back.images) == sorted(sdata.images)
    assert sorted(back.shapes) == sorted(sdata.shapes)
    for name in sdata.images:
        a, b = sdata.images[name], back.images[name]
        assert list(a) == list(b)
        np.testing.assert_array_equal(a["scale0"]["image"].values, b["scale0"]["image"].values)
        assert get_transformation(b, get_all=True).keys() == get_transformation(a, get_all=True).keys()
    for name in sdata.shapes:
        pd.testing.assert_series_equal(sdata.shapes[name]["radius"], back.shapes[name]["radius"])
    t, u = sdata.tables["table"], back.tables["table"]
    np.testing.assert_array_equal(t.X.toarray(), u.X.toarray())
    pd.testing.assert_frame_equal(t.obs, u.obs)
    pd.testing.assert_frame_equal(t.var, u.var)
    np.testing.assert_array_equal(t.obsm["spatial"], u.obsm["spatial"])
    assert u.uns["stpred"] == t.uns["stpred"]


# ---------------------------------------------------------------------------------------------------------------------
# real HER2 data
# ---------------------------------------------------------------------------------------------------------------------
def _expected_spots(root: Path, section: str) -> pd.Series:
    """Per-spot count totals of the selected spots in both files, computed with pandas from the TSVs."""
    counts = pd.read_csv(root / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(root / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    keys = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    totals = counts.sum(axis=1)
    totals = totals[totals.index.isin(keys)]
    totals.index = f"{section}_" + totals.index
    return totals


@pytest.fixture(scope="module")
def her2st_all(her2st_path):
    """All five real sections, read once for this module (about 20 s on a quiet machine)."""
    return stpred.datasets.her2st(her2st_path)


@pytest.mark.her2st
def test_her2st_all_sections(her2st_all, her2st_path, assert_contract):
    sdata = her2st_all
    assert_contract(sdata)
    table = sdata.tables["table"]
    sections = ["C2", "C3", "C4", "C5", "C6"]
    assert list(table.obs["section"].cat.categories) == sections
    assert set(table.obs["patient"]) == {"C"}
    assert sorted(sdata.coordinate_systems) == sections
    totals = pd.Series(np.asarray(table.X.sum(axis=1)).ravel(), index=table.obs_names)
    for section in sections:
        expected = _expected_spots(her2st_path, section)
        got = totals[table.obs["section"] == section]
        assert len(got) == len(expected) == len(sdata.shapes[f"{section}_spots"])
        pd.testing.assert_series_equal(got.sort_index(), expected.sort_index().astype(got.dtype), check_names=False)
        # legacy ST images are ~0.69 µm/px (grid step ~290 px)
        assert 0.6 < table.uns["stpred"]["mpp"][section] < 0.8
        # the grid step (4 × radius) agrees with a fit of pixels on the sub-grid coordinates new_x, new_y
        spots = pd.read_csv(her2st_path / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
        step = np.sqrt(
            np.polyfit(spots["new_x"], spots["pixel_x"], 1)[0] * np.polyfit(spots["new_y"], spots["pixel_y"], 1)[0]
        )
        radius = sdata.shapes[f"{section}_spots"]["radius"].to_numpy()
        np.testing.assert_allclose(radius, step / 4, rtol=0.01)
        assert sdata.images[f"{section}_hne"]["scale0"]["image"].data.chunksize == (3, 1024, 1024)


@pytest.mark.her2st
def test_her2st_one_section_zarr_round_trip(her2st_all, tmp_path):
    import spatialdata as sd

    c2 = her2st_all.subset(["C2_hne", "C2_spots"], filter_tables=True)
    assert c2.tables["table"].n_obs == len(c2.shapes["C2_spots"])
    c2.write(tmp_path / "c2.zarr")
    _assert_same(c2, sd.read_zarr(tmp_path / "c2.zarr"))


def test_her2st_unknown_section(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown section\(s\) \['C7'\]; the data has \['C2', 'C3', 'C4'"):
        stpred.datasets.her2st(tmp_path, sections=["C7"])


def test_her2st_path_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"The HER2 data folder '.*nowhere' \(from `path`\) does not exist"):
        stpred.datasets.her2st(tmp_path / "nowhere", sections=["C2"])
    monkeypatch.setenv("STPRED_HER2ST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\(from \$STPRED_HER2ST\) lacks \['ST-cnts/C2.tsv.gz'"):
        stpred.datasets.her2st(sections=["C2"])


def _her2st_layout(root: Path, section: str = "C2") -> None:
    """Write a tiny legacy-ST section under the her2st folder layout."""
    from stpred.datasets._her2st import _files

    files = _files(section)
    paths = _write_legacy(root / "tmp", section=section, image_suffix=".jpg")
    for key, relative in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        paths[key].replace(root / relative)


def test_her2st_local_layout_and_download(tmp_path, monkeypatch):
    from stpred.datasets import _her2st

    source = tmp_path / "source"
    _her2st_layout(source)
    local = stpred.datasets.her2st(source, sections=["C2"])
    assert set(local.tables["table"].obs["patient"]) == {"C"}
    # the download path, served from a local file:// URL instead of GitHub
    cache = tmp_path / "cache"
    _her2st._download(cache, ["C2"], base_url=source.as_uri())
    for relative in _her2st._files("C2").values():
        assert (cache / relative).read_bytes() == (source / relative).read_bytes()
    monkeypatch.setattr(_her2st, "_resolve", lambda path, sections: cache)
    fetched = stpred.datasets.her2st(sections=["C2"])
    np.testing.assert_array_equal(fetched.tables["table"].X.toarray(), local.tables["table"].X.toarray())
    with pytest.raises(ConnectionError, match="Are you offline?.*https://github.com/almaan/her2st"):
        _her2st._download(tmp_path / "empty", ["C3"], base_url=(tmp_path / "missing").as_uri())
    assert not any((tmp_path / "empty").rglob("*.part"))


# ---------------------------------------------------------------------------------------------------------------------
# read_visium on a tiny Space Ranger folder
# ---------------------------------------------------------------------------------------------------------------------
def _write_visium(
    root: Path, *, full: int = 400, hires_scalef: float = 0.25, counts: str | None = "h5", hires: bool = True
) -> dict:
    """A 12-spot Space Ranger folder (10x HDF5 v3 or mtx folder, positions, scale factors, hires/lowres PNG) plus a
    full-res TIFF."""
    import gzip
    import json

    import h5py
    import scipy.io
    import tifffile
    from scipy import sparse

    (root / "spatial").mkdir(parents=True)
    rng = np.random.default_rng(0)
    genes = ["g1", "g2", "g3", "g2"]
    n = 12
    x = rng.integers(0, 6, (n, len(genes)))
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    matrix = sparse.csc_matrix(x.T)  # genes × barcodes, as Space Ranger stores it
    ids = [f"ENSG{i}" for i in range(len(genes))]
    if counts == "h5":
        with h5py.File(root / "filtered_feature_bc_matrix.h5", "w") as f:
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
    elif counts == "mtx":
        folder = root / "filtered_feature_bc_matrix"
        folder.mkdir()
        with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sparse.coo_matrix(x.T))
        with gzip.open(folder / "features.tsv.gz", "wt") as fh:
            fh.writelines(f"{i}\t{g}\tGene Expression\n" for i, g in zip(ids, genes))
        with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
            fh.writelines(f"{b}\n" for b in barcodes)
    rows = np.arange(n) // 4
    cols = (np.arange(n) % 4) * 2 + rows % 2
    pixel_y, pixel_x = 50 + rows * 60, 50 + cols * 35
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": pixel_y,
            "pxl_col_in_fullres": pixel_x,
        }
    ).to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    scalefactors = {
        "spot_diameter_fullres": 40.0,
        "tissue_hires_scalef": hires_scalef,
        "tissue_lowres_scalef": hires_scalef / 4,
        "fiducial_diameter_fullres": 60.0,
    }
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    image = rng.integers(0, 256, (full, full, 3), dtype=np.uint8)
    tifffile.imwrite(root / "fullres.tif", image)
    if hires:
        Image.fromarray(image[::4, ::4]).save(root / "spatial" / "tissue_hires_image.png")
    Image.fromarray(image[::16, ::16]).save(root / "spatial" / "tissue_lowres_image.png")
    return {
        "counts": x,
        "barcodes": barcodes,
        "xy": np.c_[pixel_x, pixel_y],
        "array": np.c_[cols, rows],
        "image": image,
    }


def test_read_visium_fullres(tmp_path, assert_contract):
    truth = _write_visium(tmp_path / "V1")
    sdata = stpred.io.read_visium(tmp_path / "V1", fullres_image_file="fullres.tif", patient="D")
    assert_contract(sdata)
    assert sorted(sdata.images) == ["V1_hne"]
    assert sorted(sdata.shapes) == ["V1_spots"]
    table = sdata.tables["table"]
    assert table.obs_names.tolist() == [f"V1_{b}" for b in truth["barcodes"]]
    assert table.var_names.tolist() == ["g1", "g2", "g3", "g2-1"]
    np.testing.assert_array_equal(table.X.toarray(), truth["counts"])
    np.testing.assert_allclose(table.obsm["spatial"], truth["xy"])
    np.testing.assert_array_equal(table.obs[["array_x", "array_y"]].to_numpy(), truth["array"])
    assert set(table.obs["patient"]) == {"D"}
    assert table.uns["stpred"]["mpp"]["V1"] == pytest.approx(55.0 / 40.0)
    assert table.uns["stpred"]["technology"]["V1"] == "visium"
    assert table.uns["stpred"]["pitch_um"]["V1"] == 100.0
    np.testing.assert_allclose(sdata.shapes["V1_spots"]["radius"], 20.0)
    image = sdata.images["V1_hne"]["scale0"]["image"].values
    np.testing.assert_array_equal(image, np.moveaxis(truth["image"], -1, 0))


def test_read_visium_hires_only(tmp_path, assert_contract):
    truth = _write_visium(tmp_path / "V2")
    sdata = stpred.io.read_visium(tmp_path / "V2", section="S9")
    assert_contract(sdata)
    table = sdata.tables["table"]
    assert set(table.obs["patient"]) == {"S9"}
    np.testing.assert_allclose(table.obsm["spatial"], truth["xy"] * 0.25)
    np.testing.assert_allclose(sdata.shapes["S9_spots"]["radius"], 5.0)
    assert table.uns["stpred"]["mpp"]["S9"] == pytest.approx(55.0 / 40.0 / 0.25)
    image = sdata.images["S9_hne"]["scale0"]["image"].values
    np.testing.assert_array_equal(image, np.moveaxis(truth["image"][::4, ::4], -1, 0))
    # the spot centres fall on the same pixels in hires as in the full-resolution image
    ix, iy = np.floor(table.obsm["spatial"]).astype(int).T
    fx, fy = (truth["xy"] // 4 * 4).T
    np.testing.assert_array_equal(image[:, iy, ix], np.moveaxis(truth["image"][fy, fx], -1, 0))


def test_read_visium_mtx_folder_reads_like_h5(tmp_path, assert_contract):
    _write_visium(tmp_path / "h5" / "V1")
    truth = _write_visium(tmp_path / "mtx" / "V1", counts="mtx")
    assert not (tmp_path / "mtx" / "V1" / "filtered_feature_bc_matrix.h5").exists()
    sdata = stpred.io.read_visium(tmp_path / "mtx" / "V1")
    assert_contract(sdata)
    table = sdata.tables["table"]
    reference = stpred.io.read_visium(tmp_path / "h5" / "V1").tables["table"]
    np.testing.assert_array_equal(table.X.toarray(), truth["counts"])
    np.testing.assert_array_equal(table.X.toarray(), reference.X.toarray())
    # symbols are the var_names (made unique in file order), the Ensembl ids a column
    assert table.var_names.tolist() == reference.var_names.tolist() == ["g1", "g2", "g3", "g2-1"]
    assert table.var["gene_ids"].tolist() == ["ENSG0", "ENSG1", "ENSG2", "ENSG3"]
    np.testing.assert_allclose(table.obsm["spatial"], reference.obsm["spatial"])
    assert table.uns["stpred"]["image"] == {"V1": "hires"}


def test_read_visium_falls_back_to_lowres(tmp_path, assert_contract):
    truth = _write_visium(tmp_path / "V3", hires=False)
    sdata = stpred.io.read_visium(tmp_path / "V3")
    assert_contract(sdata)
    table = sdata.tables["table"]
    lowres = 0.25 / 4
    np.testing.assert_allclose(table.obsm["spatial"], truth["xy"] * lowres)
    np.testing.assert_allclose(sdata.shapes["V3_spots"]["radius"], 20.0 * lowres)
    assert table.uns["stpred"]["mpp"]["V3"] == pytest.approx(55.0 / 40.0 / lowres)
    assert table.uns["stpred"]["image"] == {"V3": "lowres"}
    image = sdata.images["V3_hne"]["scale0"]["image"].values
    np.testing.assert_array_equal(image, np.moveaxis(truth["image"][::16, ::16], -1, 0))


def test_read_visium_missing_files_are_named(tmp_path):
    _write_visium(tmp_path / "none", counts=None)
    with pytest.raises(
        FileNotFoundError,
        match=r"No counts found .*'filtered_feature_bc_matrix.h5'.*'filtered_feature_bc_matrix/' with "
        r"\['matrix.mtx.gz', 'features.tsv.gz', 'barcodes.tsv.gz'\]",
    ):
        stpred.io.read_visium(tmp_path / "none")
    _write_visium(tmp_path / "partial", counts="mtx")
    (tmp_path / "partial" / "filtered_feature_bc_matrix" / "features.tsv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['features.tsv.gz'\]"):
        stpred.io.read_visium(tmp_path / "partial")
    _write_visium(tmp_path / "noimg", hires=False)
    (tmp_path / "noimg" / "spatial" / "tissue_lowres_image.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"No image .*tissue_hires_image.png.*tissue_lowres_image.png.*fullres_image_file="):
        stpred.io.read_visium(tmp_path / "noimg")
    (tmp_path / "noimg" / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"No spot positions .*tissue_positions.csv.*tissue_positions_list.csv"):
        stpred.io.read_visium(tmp_path / "noimg")


def test_read_visium_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="The Visium folder '.*nowhere' does not exist"):
        stpred.io.read_visium(tmp_path / "nowhere")
    _write_visium(tmp_path / "V1")
    with pytest.raises(ValueError, match=r"Invalid section name 'a b': use letters, digits"):
        stpred.io.read_visium(tmp_path / "V1", section="a b")
    with pytest.raises(FileNotFoundError, match="The image file '.*missing.tif' does not exist"):
        stpred.io.read_visium(tmp_path / "V1", fullres_image_file="missing.tif")
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"spot centre\(s\) lie outside the 100×100 image"):
        stpred.io.read_visium(tmp_path / "V1", fullres_image_file=tmp_path / "small.png")
    (tmp_path / "V1" / "spatial" / "scalefactors_json.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks \['spot_diameter_fullres'\]"):
        stpred.io.read_visium(tmp_path / "V1")


def test_concat_visium_with_legacy_st(tmp_path, assert_contract):
    _write_visium(tmp_path / "V1")
    visium = stpred.io.read_visium(tmp_path / "V1")
    legacy = _read(_write_legacy(tmp_path / "st"), section="T1")
    sdata = stpred.io.concat([legacy, visium])
    assert_contract(sdata)
    uns = sdata.tables["table"].uns["stpred"]
    assert uns["technology"] == {"T1": "legacy_st", "V1": "visium"}
    assert uns["pitch_um"] == {"T1": 200.0, "V1": 100.0}
    obs = sdata.tables["table"].obs
    assert obs.loc[obs["section"] == "V1", "in_tissue"].eq(1).all()
    assert obs.loc[obs["section"] == "T1", "in_tissue"].isna().all()


def test_concat_needs_sections(tmp_path):
    a = _read(_write_legacy(tmp_path / "a"), section="A")
    del a.tables["table"].obs["section"]
    with pytest.raises(KeyError, match=r"The table of object 0 has no `obs\['section'\]` column"):
        stpred.io.concat([a])
