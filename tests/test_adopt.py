"""Bring your own data: the same calls on an stpred reader object, a spatialdata-io object and a scanpy AnnData;
a saved predictor on a section read on its own; a zarr round trip into a new process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stpred

sys.path.insert(0, str(Path(__file__).parent))
from test_io import _write_visium

CONFIG = {"width": 8, "n_heads": 2, "spot_size": 16, "context_size": 32, "grids": (1, 2, 4)}
FIT = {"max_epochs": 1, "batch_size": 16, "val": False, "progress": False, **CONFIG}


def _sdio_visium(root: Path, name: str = "V1"):
    import spatialdata_io

    _write_visium(root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata_io.visium(root / name, dataset_id=name, counts_file="filtered_feature_bc_matrix.h5")


def _scanpy_visium(root: Path, name: str = "V1"):
    """An AnnData in `sc.read_visium`'s layout (built in memory from the same Space Ranger folder)."""
    import anndata as ad
    from PIL import Image

    truth = _write_visium(root / name)
    hires = np.asarray(Image.open(root / name / "spatial" / "tissue_hires_image.png"), dtype=np.float32) / 255.0
    adata = ad.AnnData(
        X=truth["counts"].astype(np.float32),
        obs=pd.DataFrame(index=truth["barcodes"]),
        var=pd.DataFrame(index=["g1", "g2", "g3", "g2-1"]),
    )
    adata.obsm["spatial"] = truth["xy"].astype(np.float64)
    adata.uns["spatial"] = {
        name: {
            "images": {"hires": hires},
            "scalefactors": {"tissue_hires_scalef": 0.25, "spot_diameter_fullres": 40.0},
        }
    }
    return adata


def _run(obj) -> pd.DataFrame:
    stpred.pp.select_genes(obj, n_top=3)
    stpred.pp.normalize(obj)
    stpred.pp.extract_patches(obj, size=16, context_size=32, progress=False)
    stpred.tl.fit(obj, "hifusion", **FIT)
    stpred.tl.predict(obj, "hifusion", progress=False)
    return stpred.tl.evaluate(obj, "stpred_hifusion", n_boot=10)


def test_same_calls_on_a_spatialdata_io_visium_object(tmp_path):
    sdata = _sdio_visium(tmp_path)
    before = {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")}
    scores = _run(sdata)
    assert np.isfinite(scores["value"]).any()
    table = sdata.tables["stpred"]
    layout = table.uns["stpred"]["layout"]["sections"]["V1"]
    assert layout["image"] == "V1_hires_image"  # no full-res image: the hires one, through its transformation
    assert layout["shapes"] == "V1"
    assert layout["mpp"] == pytest.approx(55 / 40)  # µm per full-resolution pixel (spot coordinates)
    assert layout["image_scale"] == pytest.approx(0.25)
    assert list(table.obs["section"].unique()) == ["V1"]
    assert table.layers["stpred_hifusion"].shape == table.shape
    # stpred adds, never renames: the user's elements are all still there under their names
    after = {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")}
    assert after["images"] == before["images"]
    assert after["shapes"] == before["shapes"]
    assert after["tables"] == sorted([*before["tables"], "stpred"])
    assert "section" not in sdata.tables["table"].obs
    # crops come from the hires image at the spot centres mapped through Scale(0.25)
    bank = stpred.pp.extract_patches(sdata, size=4, context_size=None, progress=False)
    hires = np.asarray(sdata.images["V1_hires_image"].data)
    x, y = (np.asarray(table.obsm["spatial"][0]) * 0.25).astype(int)
    np.testing.assert_array_equal(bank.spot[0], hires[:, y - 2 : y + 2, x - 2 : x + 2])
    # plots put the hires image under the spots (extent in full-resolution pixels, the spot coordinates)
    import matplotlib.pyplot as plt

    from stpred.pl._spatial import _section_image

    rgb, extent = _section_image(sdata, "stpred", "V1", (0.0, 0.0, 400.0, 400.0))
    assert rgb.shape[:2] == (100, 100)
    assert extent == pytest.approx((0.0, 400.0, 400.0, 0.0))
    fig = stpred.pl.spatial(sdata, list(table.var_names[:1]), layers=["target", "stpred_hifusion"], show=False)
    plt.close(fig)


def test_tiles_on_a_spatialdata_io_visium_image_get_its_resolution_and_predictions(tmp_path):
    """H&E-only prediction on the hires and lowres images of a spatialdata-io Visium section (names not `_hne`)."""
    sdata = _sdio_visium(tmp_path)
    with pytest.raises(ValueError, match=r"mpp=.*stpred\.io\.adopt"):
        stpred.pp.tile(sdata, image_key="V1_hires_image", size_um=55, tissue=False)
    assert "stpred" not in sdata.tables
    assert not any(k.endswith("_tiles") for k in sdata.shapes)
    _run(sdata)  # adopts the section, fits and predicts HiFusion at the spots
    for image_key, scale in (("V1_hires_image", 0.25), ("V1_lowres_image", 1 / 16)):
        stpred.pp.tile(sdata, image_key=image_key, size_um=55, tissue=False, key_added=f"tiles_{image_key}")
        tiles = sdata.tables[f"tiles_{image_key}_table"]
        # µm per pixel of this image, through its transformation: 55/40 µm per full-resolution pixel / scale
        assert tiles.uns["stpred"]["mpp"] == {"V1": pytest.approx(55 / 40 / scale)}
        assert list(tiles.obs["section"].unique()) == ["V1"]
        assert tiles.n_obs == 100  # the same 550 µm image in both, 10 × 10 tiles of 55 µm (10 px hires, 2.5 px lowres)
    stpred.tl.predict(sdata, "hifusion", region="tiles_V1_hires_image", progress=False)
    tiles = sdata.tables["tiles_V1_hires_image_table"]
    assert np.isfinite(tiles.layers["stpred_hifusion"]).all()
    assert tiles.layers["stpred_hifusion"].std(axis=0).max() > 0
    import matplotlib.pyplot as plt

    fig = stpred.pl.spatial(
        sdata, list(tiles.var_names[:1]), layers="stpred_hifusion", table_key="tiles_V1_hires_image_table", show=False
    )
    assert fig.axes[0].images, "the hires image is drawn under the tiles"
    plt.close(fig)


def test_same_calls_on_a_scanpy_anndata(tmp_path):
    adata = _scanpy_visium(tmp_path)
    n_vars, uns_spatial = adata.n_vars, adata.uns["spatial"]
    scores = _run(adata)
    assert np.isfinite(scores["value"]).any()
    # results live in the user's AnnData: layers of the selected genes as obsm DataFrames, recipe in uns
    assert adata.n_vars == n_vars
    assert adata.uns["spatial"] is uns_spatial
    pred = adata.obsm["stpred_hifusion"]
    assert isinstance(pred, pd.DataFrame)
    assert pred.shape == (adata.n_obs, 3)
    assert list(pred.columns) == adata.uns["stpred"]["table"]["genes"]
    assert "stpred_target" in adata.obsm
    assert adata.uns["stpred"]["table"]["models"]["hifusion"]["checkpoint"]
    import matplotlib.pyplot as plt

    plt.close(stpred.pl.spatial(adata, list(pred.columns[:1]), show=False))
    stpred.tl.domains(adata, layer="stpred_hifusion", n_domains=2, n_pcs=2)
    assert adata.obs["domains_stpred_hifusion"].notna().all()  # added to the user's obs, as squidpy does
    assert "X_pca_domains_stpred_hifusion" in adata.obsm


def test_same_calls_on_an_stpred_reader_object(tmp_path):
    sdata = stpred.io.read_visium(tmp_path / "V1" if _write_visium(tmp_path / "V1") else None)
    scores = _run(sdata)
    assert np.isfinite(scores["value"]).any()
    assert sdata.tables["stpred"].uns["stpred"]["layout"]["sections"]["V1"]["image"] == "V1_hne"


def test_adopt_rules_and_bad_input(tmp_path):
    import spatialdata
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    sdata = _sdio_visium(tmp_path)
    # two equally plausible images and none named: refused, listing them, object unchanged
    other = Image2DModel.parse(np.zeros((3, 10, 10), dtype=np.uint8), transformations={"V1": Identity()})
    sdata.images["my_stain"] = other
    sdata.images["my_other_stain"] = spatialdata.deepcopy(other)
    del sdata.images["V1_hires_image"], sdata.images["V1_lowres_image"]
    with pytest.raises(ValueError, match=r"several images .*\['my_other_stain', 'my_stain'\].*image_key="):
        stpred.pp.select_genes(sdata, n_top=2)
    assert "stpred" not in sdata.tables
    assert "stpred" not in sdata.tables["table"].uns
    layout = stpred.io.adopt(sdata, image_key="my_stain")  # named once ...
    assert layout.sections["V1"].image == "my_stain"
    stpred.pp.select_genes(sdata, n_top=2)  # ... found by every later call
    assert sdata.tables["stpred"].uns["stpred"]["layout"]["sections"]["V1"]["image"] == "my_stain"
    with pytest.raises(KeyError, match="No image 'nope'"):
        stpred.io.adopt(sdata, image_key="nope")
    with pytest.raises(KeyError, match="No column 'library'"):
        stpred.io.adopt(sdata, section_key="library")

    # a table that annotates no shapes
    lone = _sdio_visium(tmp_path / "b")
    del lone.tables["table"].uns["spatialdata_attrs"]
    with pytest.raises(ValueError, match=r"annotates no shapes.*TableModel.parse"):
        stpred.pp.select_genes(lone, n_top=2)
    assert "stpred" not in lone.tables

    # spots with no coordinates
    adata = _scanpy_visium(tmp_path / "c")
    adata.obsm["spatial"][0] = np.nan
    with pytest.raises(ValueError, match="1 spots have no coordinates"):
        stpred.pp.select_genes(adata, n_top=2)
    assert "stpred" not in adata.uns
    sd = _sdio_visium(tmp_path / "d")
    sd.tables["table"].obs["spot_id"] = sd.tables["table"].obs["spot_id"] + 100
    with pytest.raises(ValueError, match="have no coordinates"):
        stpred.pp.select_genes(sd, n_top=2)
    # several libraries in one AnnData and no library column
    two = _scanpy_visium(tmp_path / "e")
    two.uns["spatial"]["V2"] = two.uns["spatial"]["V1"]
    with pytest.raises(ValueError, match="pass `section_key=`"):
        stpred.pp.select_genes(two, n_top=2)
    assert "stpred" not in two.uns
    two.obs["library_id"] = pd.Categorical(["V1"] * 6 + ["V2"] * 6)
    layout = stpred.io.adopt(two, section_key="library_id")  # squidpy's library_key, named once
    assert sorted(layout.sections) == ["V1", "V2"]
    assert layout.sections["V2"].image == "V2_hires"
    stpred.pp.select_genes(two, n_top=2)
    assert two.uns["stpred"]["table"]["gene_selection"]["sections"] == ["V1", "V2"]


def test_xenium_cells_are_pooled_not_adopted_as_spots():
    from test_io_instruments import _xenium_like

    cells, _, _ = _xenium_like()
    with pytest.raises(ValueError, match=r"Xenium cells .*xenium_pseudospots"):
        stpred.pp.select_genes(cells, n_top=2)
    assert "stpred" not in cells.tables
    spots = stpred.io.xenium_pseudospots(cells, spot_size_um=100, section="X1")
    stpred.pp.select_genes(spots, n_top=2)  # the pooled object is an stpred object
    assert sorted(spots.tables["stpred"].obs["section"].unique()) == ["X1"]
    # end to end on the pseudo-spots: fit a small model, predict, domains
    stpred.pp.normalize(spots)
    stpred.pp.extract_patches(spots, size=16, context_size=32, progress=False)
    stpred.tl.fit(spots, "hifusion", **FIT)
    stpred.tl.predict(spots, "hifusion", progress=False)
    stpred.tl.domains(spots, layer="stpred_hifusion", n_domains=2, n_pcs=2)
    assert spots.tables["stpred"].obs["domains_stpred_hifusion"].notna().all()


def test_saved_predictor_on_a_section_read_on_its_own(tmp_path):
    train = _sdio_visium(tmp_path / "a", "P1")
    stpred.pp.select_genes(train, n_top=3)
    stpred.pp.normalize(train)
    stpred.pp.extract_patches(train, size=16, context_size=32, progress=False)
    predictor = stpred.tl.fit(train, "hifusion", **FIT)
    path = predictor.save(tmp_path / "model")

    other = _sdio_visium(tmp_path / "b", "P2")  # another section, read on its own: no stpred table
    stpred.tl.predict(other, model=path, progress=False)
    table = other.tables["stpred"]
    assert list(table.var_names) == predictor.genes
    assert table.uns["stpred"]["normalize"]["method"] == predictor.normalize["method"]
    assert table.uns["stpred"]["predictions"]["stpred_hifusion"]["checkpoint"] == str(path)
    assert np.isfinite(table.layers["stpred_hifusion"]).all()
    scores = stpred.tl.evaluate(other, "stpred_hifusion", n_boot=10)
    assert "P2" in set(scores["group"].astype(str))

    # genes the new object does not measure: a KeyError naming them, object unchanged
    narrow = _sdio_visium(tmp_path / "c", "P3")
    raw = narrow.tables["table"]
    gone = predictor.genes[0]
    narrow.tables["table"] = raw[:, raw.var_names != gone].copy()
    with pytest.raises(KeyError, match=rf"1 of the predictor's 3 genes are not in `var_names`.*{gone}.*missing_genes='nan'"):
        stpred.tl.predict(narrow, model=path, progress=False)
    assert "stpred" not in narrow.tables
    # ... unless asked to predict them without measured values: counts and targets NaN, predictions not
    stpred.tl.predict(narrow, model=path, missing_genes="nan", progress=False)
    table = narrow.tables["stpred"]
    assert list(table.var_names) == predictor.genes
    assert np.isnan(table.X[:, 0]).all()
    assert np.isfinite(table.X[:, 1:]).all()
    assert np.isfinite(table.layers["stpred_hifusion"]).all()
    assert table.uns["stpred"]["made_for"]["missing_genes"] == [gone]

    # the same saved predictor on a scanpy AnnData of a third section: results land in the AnnData
    adata = _scanpy_visium(tmp_path / "d", "P4")
    stpred.tl.predict(adata, model=path, progress=False)
    assert list(adata.obsm["stpred_hifusion"].columns) == predictor.genes
    assert adata.uns["stpred"]["table"]["made_for"]["checkpoint"] == str(path)


def test_zarr_round_trip_in_a_new_process(tmp_path):
    sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    stpred.pp.select_genes(sdata, n_top=4)
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=16, context_size=32, progress=False)
    store = tmp_path / "data.zarr"
    sdata.write(store)
    import spatialdata

    backed = spatialdata.read_zarr(store)
    stpred.tl.fit(backed, "hifusion", **FIT)  # saved next to the store, recorded in uns
    checkpoint = backed.tables["stpred"].uns["stpred"]["models"]["hifusion"]["checkpoint"]
    assert Path(checkpoint).is_relative_to(tmp_path)
    store = tmp_path / "fitted.zarr"
    backed.write(store)  # the table now records the checkpoint

    script = textwrap.dedent(
        f"""
        import numpy as np, spatialdata, stpred
        sdata = spatialdata.read_zarr({str(store)!r})
        stpred.tl.predict(sdata, model="hifusion", progress=False)  # patches re-cut, predictor found
        layer = sdata.tables["stpred"].layers["stpred_hifusion"]
        assert np.isfinite(layer).all(), layer
        stpred.tl.fit(sdata, "hifusion", max_epochs=1, batch_size=16, val=False, progress=False,
                      width=8, n_heads=2, spot_size=16, context_size=32, grids=(1, 2, 4))
        print("OK", layer.shape)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=_env(), check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    root = str(Path(stpred.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_same_calls_on_a_spatialdata_io_visium_hd_object(tmp_path):
    import spatialdata_io
    from test_io_instruments import HD_MPP, _write_visium_hd

    _write_visium_hd(tmp_path / "HD1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium_hd(tmp_path / "HD1", dataset_id="HD1", load_segmentations_only=False)
    with pytest.raises(ValueError, match=r"Cannot tell which table.*'square_008um', 'square_016um'.*table_key="):
        stpred.pp.select_genes(sdata, n_top=3)  # one table per bin size: name the one to use ...
    assert "stpred" not in sdata.tables
    stpred.io.adopt(sdata, table_key="square_016um")  # ... once
    stpred.pp.select_genes(sdata, n_top=3)
    layout = sdata.tables["stpred"].uns["stpred"]["layout"]
    sec = layout["sections"]["HD1_square_016um"]
    assert sec["image"] == "HD1_hires_image"
    assert sec["mpp"] == pytest.approx(HD_MPP)  # 16 µm bins, 32 full-res px wide
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=16, context_size=32, mpp=1.0, progress=False)
    stpred.tl.fit(sdata, "hifusion", **FIT)
    stpred.tl.predict(sdata, "hifusion", progress=False)
    scores = stpred.tl.evaluate(sdata, "stpred_hifusion", n_boot=10)
    assert np.isfinite(scores["value"]).any()
    stpred.tl.domains(sdata, layer="stpred_hifusion", n_domains=2, n_pcs=2)
    assert sdata.tables["stpred"].obs["domains_stpred_hifusion"].notna().all()
    # the raw tables are untouched but for the recorded layout
    assert sorted(sdata.tables) == ["square_008um", "square_016um", "stpred"]
