"""Uncertainty (MC-dropout, deep ensembles) and out-of-distribution scores through tl.fit / tl.predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stpred
from stpred.models.hifusion import TINY_CONFIG
from stpred.pp._patches import get_patch_bank
from stpred.tl._ood import fit_reference, ledoit_wolf


@pytest.fixture(scope="module")
def fitted():
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=30, seed=2, n_patients=1)
    stpred.pp.select_genes(sdata, n_top=20, sections=["S0", "S1"])
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=TINY_CONFIG["spot_size"], context_size=TINY_CONFIG["context_size"])
    ensemble = stpred.tl.fit(
        sdata, "hifusion", train=["S0", "S1"], max_epochs=2, batch_size=16, progress=False, n_models=2, **TINY_CONFIG
    )
    return sdata, ensemble


def _rows(sdata, section):
    return np.flatnonzero((sdata.tables["stpred"].obs["section"] == section).to_numpy())


def test_mc_dropout_writes_a_varying_std_and_keeps_batchnorm_in_eval(fitted):
    sdata, ensemble = fitted
    member = ensemble.members[0]
    bn = next(m for m in member.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    stpred.tl.predict(
        sdata, member, sections=["S2"], key_added="mc", uncertainty="mc_dropout", n_samples=6, progress=False
    )
    table = sdata.tables["stpred"]
    std = table.layers["mc_std"][_rows(sdata, "S2")]
    assert np.isfinite(std).all()
    assert std.min() >= 0
    assert std.std() > 0  # not constant across spots and genes
    assert np.isnan(table.layers["mc_std"][_rows(sdata, "S0")]).all()
    assert torch.equal(bn.running_mean, before)  # BatchNorm statistics untouched: it stayed in eval mode
    # the mean of the dropout passes stays near the deterministic prediction
    plain = member.predict(sdata, ["S2"], progress=False)
    assert np.abs(table.layers["mc"][_rows(sdata, "S2")] - plain).mean() < 0.5 * np.abs(plain).mean()
    assert table.uns["stpred"]["predictions"]["mc"]["uncertainty"]["method"] == "mc_dropout"
    # same seed, same samples
    stpred.tl.predict(
        sdata, member, sections=["S2"], key_added="mc", uncertainty="mc_dropout", n_samples=6, progress=False,
        overwrite=True,
    )  # fmt: skip
    np.testing.assert_array_equal(table.layers["mc_std"][_rows(sdata, "S2")], std)


def test_mc_dropout_refused_without_dropout(fitted):
    sdata, ensemble = fitted
    member = ensemble.members[0]
    model = stpred.models.get_model("hifusion")(20, **{**TINY_CONFIG, "attn_dropout": 0.0})
    bare = stpred.tl.Predictor(
        model, name="hifusion", genes=member.genes, normalize=member.normalize, sizes=member.sizes, model_kwargs={}
    )
    layers = set(sdata.tables["stpred"].layers)
    with pytest.raises(ValueError, match="n_models"):
        stpred.tl.predict(sdata, bare, key_added="bare", uncertainty="mc_dropout", progress=False)
    assert set(sdata.tables["stpred"].layers) == layers


def test_ensemble_std_from_fit_and_from_a_list(fitted, tmp_path):
    sdata, ensemble = fitted
    assert isinstance(ensemble, stpred.tl.EnsemblePredictor)
    assert [m.info["seed"] for m in ensemble.members] == [0, 1]
    stpred.tl.predict(sdata, ensemble, sections=["S2"], key_added="ens", uncertainty="ensemble", progress=False)
    table = sdata.tables["stpred"]
    rows = _rows(sdata, "S2")
    preds = [m.predict(sdata, ["S2"], progress=False) for m in ensemble.members]
    np.testing.assert_allclose(table.layers["ens"][rows], np.mean(preds, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.layers["ens_std"][rows], np.std(preds, 0), rtol=1e-4, atol=1e-5)
    assert table.layers["ens_std"][rows].std() > 0
    # a list of predictors is an ensemble too; a saved ensemble loads back to the same numbers
    stpred.tl.predict(
        sdata, list(ensemble.members), sections=["S2"], key_added="ens2", uncertainty="ensemble", ood=False,
        progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(table.layers["ens2_std"][rows], table.layers["ens_std"][rows], rtol=1e-5, atol=1e-6)
    loaded = stpred.tl.load(ensemble.save(tmp_path / "ens"))
    assert isinstance(loaded, stpred.tl.EnsemblePredictor)
    assert loaded.ood_reference is not None
    np.testing.assert_allclose(loaded.predict(sdata, ["S2"], progress=False), np.mean(preds, 0), atol=1e-5)


def test_bad_ensembles_and_options_are_refused(fitted):
    sdata, ensemble = fitted
    a, b = ensemble.members
    other = stpred.tl.Predictor(
        b.model, name=b.name, genes=b.genes[::-1], normalize=b.normalize, sizes=b.sizes, model_kwargs={}
    )
    with pytest.raises(ValueError, match="different gene panel"):
        stpred.tl.EnsemblePredictor([a, other])
    with pytest.raises(ValueError, match="different gene panel"):
        stpred.tl.predict(sdata, [a, other], key_added="bad", uncertainty="ensemble", progress=False)
    with pytest.raises(ValueError, match="n_models=5"):
        stpred.tl.predict(sdata, a, key_added="bad", uncertainty="ensemble", progress=False)
    with pytest.raises(ValueError, match="'ensemble'"):
        stpred.tl.predict(sdata, ensemble, key_added="bad", uncertainty="mc_dropout", progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        stpred.tl.predict(sdata, a, key_added="bad", uncertainty="mc_dropout", n_samples=1, progress=False)
    with pytest.raises(ValueError, match="n_models"):
        stpred.tl.fit(sdata, "hifusion", n_models=0)
    assert "bad" not in sdata.tables["stpred"].layers


def test_ood_score_is_higher_on_glass_and_noise(fitted):
    sdata, ensemble = fitted
    member = ensemble.members[0]
    ref = member.ood_reference
    assert ref.calibrated_on == "validation"
    assert ref.n_calibration > 0
    bank = get_patch_bank(sdata)
    rows = _rows(sdata, "S2")
    spot, context = bank.spot.copy(), bank.context.copy()
    try:
        stpred.tl.predict(sdata, member, key_added="tissue", progress=False)
        table = sdata.tables["stpred"]
        tissue = table.obs["tissue_ood"].to_numpy()[rows]
        assert table.obs["tissue_ood_flag"].to_numpy()[rows].mean() < 0.2
        bank.spot[rows[::2]], bank.context[rows[::2]] = 240, 240  # bare glass
        noise = np.random.default_rng(0).integers(0, 256, size=bank.spot[rows[1::2]].shape, dtype=np.uint8)
        bank.spot[rows[1::2]] = noise
        bank.context[rows[1::2]] = np.random.default_rng(1).integers(0, 256, size=bank.context[rows[1::2]].shape)
        stpred.tl.predict(sdata, member, key_added="odd", sections=["S2"], progress=False)
    finally:
        bank.spot[:], bank.context[:] = spot, context
    odd = table.obs["odd_ood"].to_numpy()[rows]
    flags = table.obs["odd_ood_flag"].to_numpy()[rows]
    tissue_flags = table.obs["tissue_ood_flag"].to_numpy()[rows]
    # glass is far from anything seen in training; random noise (a tiny, briefly trained encoder) less so
    assert np.median(odd[::2]) > np.quantile(tissue, 0.95)
    assert flags[::2].mean() > 0.8
    assert np.median(odd[1::2]) > np.quantile(tissue, 0.75)
    assert flags[1::2].mean() > 2 * tissue_flags.mean()
    assert np.isnan(table.obs["odd_ood"].to_numpy()[_rows(sdata, "S0")]).all()
    assert table.uns["stpred"]["predictions"]["odd"]["ood"]["method"] == "mahalanobis"


def test_ood_reference_round_trip_and_opt_out(fitted, tmp_path):
    sdata, ensemble = fitted
    member = ensemble.members[0]
    loaded = stpred.tl.load(member.save(tmp_path / "p"))
    np.testing.assert_array_equal(loaded.ood_reference.precision, member.ood_reference.precision)
    assert loaded.ood_reference.threshold == member.ood_reference.threshold
    stpred.tl.predict(sdata, loaded, sections=["S2"], key_added="no_ood", ood=True, progress=False)
    assert "no_ood_ood_flag" in sdata.tables["stpred"].obs
    stpred.tl.predict(sdata, loaded, sections=["S2"], key_added="no_ood", ood=False, overwrite=True, progress=False)
    assert "no_ood_ood" not in sdata.tables["stpred"].obs  # no stale scores beside the new prediction
    assert "no_ood_ood_flag" not in sdata.tables["stpred"].obs
    loaded.ood_reference = None
    with pytest.raises(ValueError, match="ood=False"):
        stpred.tl.predict(sdata, loaded, key_added="no_ood2", ood=True, progress=False)


def test_ledoit_wolf_shrinks_toward_scaled_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 50))  # fewer samples than dimensions: the sample covariance is singular
    cov, shrink = ledoit_wolf(x)
    assert 0 < shrink <= 1
    assert np.linalg.eigvalsh(cov).min() > 0
    scales = np.arange(1.0, 6.0)
    big, shrink_big = ledoit_wolf(rng.normal(size=(5000, 5)) * np.sqrt(scales))
    assert shrink_big < 0.05  # many samples, far from a scaled identity: hardly any shrinkage
    np.testing.assert_allclose(big, np.diag(scales), atol=0.3)
    _, shrink_iso = ledoit_wolf(rng.normal(size=(200, 5)))
    assert shrink_iso > 0.5  # the truth is a scaled identity: shrink towards it
    ref = fit_reference(rng.normal(size=(500, 5)), rng.normal(size=(200, 5)))
    far = ref.score(np.full((1, 5), 6.0))
    assert far[0] > ref.threshold
    assert 0.9 < (ref.score(rng.normal(size=(2000, 5))) <= ref.threshold).mean() < 1.0


# ------------------------------------------------------------------------------------------- prediction on tiles
def _tiles_on_spots(sdata, section, key, *, size_um, into=None, image_key=None, factor=1):
    """Square tiles (as `pp.tile` writes them) centred on the spots of ``section``, in the image's pixel frame.

    By default on the section's own image (1 µm per pixel) in ``sdata``; ``into`` and ``image_key`` place them on
    another object's image of the same tissue scanned ``factor`` times finer.
    """
    from spatialdata.transformations import get_transformation

    from stpred.pp._tile import _shapes, _table

    into = sdata if into is None else into
    image_key = f"{section}_hne" if image_key is None else image_key
    spots = sdata.shapes[f"{section}_spots"]
    xy_um = np.c_[spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy()]
    xy_px = xy_um * factor
    transformations = dict(get_transformation(into.images[image_key], get_all=True))
    into.shapes[key] = _shapes(xy_px, size_px=size_um * factor, layout="square", transformations=transformations)
    into.tables[f"{key}_table"] = _table(
        key_added=key, section=section, xy_um=xy_um, xy_px=xy_px, ij=np.zeros((len(xy_um), 2), int),
        fraction=np.ones(len(xy_um)), mpp=1.0 / factor, size_um=size_um, stride_um=size_um,
        provenance={"image_key": image_key},
    )  # fmt: skip
    return spots.index.to_numpy()


def _spot_predictions(sdata, predictor, ids, section="S2"):
    """``predictor``'s predictions at the spots ``ids`` of ``section`` (genes in table order), and their table rows."""
    table = sdata.tables["stpred"]
    rows = _rows(sdata, section)
    pred = predictor.predict(sdata, [section], progress=False)[:, predictor.check_compatible(table).argsort()]
    by_id = dict(zip(table.obs["spot_id"].to_numpy()[rows], range(len(rows))))
    order = [by_id[i] for i in ids]
    return pred[order], rows[order]


def test_tile_prediction_equals_spot_prediction_at_the_same_centre(fitted):
    sdata, ensemble = fitted
    member = ensemble.members[0]
    assert member.info["geometry"]["mpp"] == 1.0
    ids = _tiles_on_spots(sdata, "S2", "S2_test_tiles", size_um=40)  # smaller than the 80 µm spots
    stpred.tl.predict(sdata, member, region="S2_test_tiles", key_added="tiles", uncertainty="mc_dropout", n_samples=3,
                      progress=False)  # fmt: skip
    tiles = sdata.tables["S2_test_tiles_table"]
    assert list(tiles.var_names) == member.genes
    assert tiles.uns["stpred"]["predictions"]["tiles"]["region"] == "S2_test_tiles"
    assert tiles.layers["tiles_std"].std() > 0
    assert "tiles_ood" in tiles.obs
    stpred.tl.predict(sdata, member, region="S2_test_tiles", key_added="det", ood=False, progress=False)
    spot_pred, spot_rows = _spot_predictions(sdata, member, ids)
    np.testing.assert_allclose(tiles.layers["det"], spot_pred, rtol=1e-5, atol=1e-5)
    # the OOD score of a tile is its spot's score
    stpred.tl.predict(sdata, member, sections=["S2"], key_added="spot_ood", ood=True, progress=False)
    np.testing.assert_allclose(
        tiles.obs["tiles_ood"].to_numpy(), sdata.tables["stpred"].obs["spot_ood_ood"].to_numpy()[spot_rows], rtol=1e-4
    )


def _upsampled_pyramid_without_full_resolution(image, factor: int = 2):
    """``image`` (a two-level synthetic pyramid) as a scan ``factor`` times finer whose finest level must not be read.

    Levels 1 and 2 are the original levels, stored; level 0 is a lazy array that fails if any of it is computed.
    """
    import dask.array as da
    from spatialdata import get_pyramid_levels
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    def refuse(block):
        msg = "the full-resolution level was read"
        raise AssertionError(msg)

    stored = [level.data for level in get_pyramid_levels(image)]
    _, height, width = stored[0].shape
    full = da.zeros((3, height * factor, width * factor), dtype=np.uint8, chunks=(3, 512, 512)).map_blocks(
        refuse, dtype=np.uint8
    )
    tree = Image2DModel.parse(
        full, dims=("c", "y", "x"), scale_factors=[factor, 2], transformations={"global": Scale([1 / factor] * 2, axes=("x", "y"))}
    )
    for key, data in zip(["scale1", "scale2"], stored, strict=True):
        assert tree[key]["image"].shape == data.shape
        tree[key]["image"].data = data
    return tree


def test_tile_crops_come_from_the_stored_level_of_a_finer_scan(fitted):
    """Same tissue scanned 2x finer (µm per pixel halved), finest level lazy and unreadable: same predictions.

    The image has a name of its own (not ``"<section>_hne"``): the tiles table's record of its image finds it.
    """
    from spatialdata import SpatialData

    sdata, ensemble = fitted
    member = ensemble.members[0]
    he = SpatialData(images={"slide_2x": _upsampled_pyramid_without_full_resolution(sdata.images["S2_hne"])})
    ids = _tiles_on_spots(sdata, "S2", "tiles", size_um=40, into=he, image_key="slide_2x", factor=2)
    stpred.tl.predict(he, member, region="tiles", key_added="fine", ood=False, progress=False)
    spot_pred, _ = _spot_predictions(sdata, member, ids)
    np.testing.assert_allclose(he.tables["tiles_table"].layers["fine"], spot_pred, rtol=1e-5, atol=1e-5)


def test_predicted_tiles_work_with_scanpy_squidpy_and_spatialdata_plot(fitted):
    """The tiles table after `tl.predict(region=)` is what the scverse tools expect, without any conversion."""
    import matplotlib.pyplot as plt
    import scanpy as sc
    import spatialdata
    import spatialdata_plot  # noqa: F401  (registers `sdata.pl`)
    import squidpy as sq
    from spatialdata.models import TableModel

    sdata, ensemble = fitted
    member = ensemble.members[0]
    _tiles_on_spots(sdata, "S2", "S2_scverse_tiles", size_um=80)
    stpred.tl.predict(sdata, member, region="S2_scverse_tiles", key_added="pred", progress=False)
    tiles = sdata.tables["S2_scverse_tiles_table"]
    TableModel().validate(tiles)
    _, joined = spatialdata.join_spatialelement_table(
        sdata, spatial_element_names="S2_scverse_tiles", table_name="S2_scverse_tiles_table", how="inner"
    )
    assert joined.n_obs == tiles.n_obs

    sq.gr.spatial_neighbors_knn(tiles, n_neighs=4)
    assert tiles.obsp["spatial_connectivities"].shape == (tiles.n_obs, tiles.n_obs)
    sc.pp.pca(tiles, layer="pred", n_comps=5)
    sc.pp.neighbors(tiles, use_rep="X_pca", n_neighbors=8)
    sc.tl.leiden(tiles, flavor="igraph", n_iterations=2, resolution=0.5)
    assert tiles.obs["leiden"].nunique() >= 1

    gene = member.genes[0]
    fig, ax = plt.subplots()
    sdata.pl.render_shapes("S2_scverse_tiles", color=gene, table_name="S2_scverse_tiles_table", table_layer="pred").pl.show(
        ax=ax, coordinate_systems="S2"
    )
    assert ax.collections, "spatialdata-plot drew nothing"
    plt.close(fig)


def test_region_refusals_leave_the_object_unchanged(fitted):
    sdata, ensemble = fitted
    member = ensemble.members[0]
    with pytest.raises(KeyError, match="shapes element"):
        stpred.tl.predict(sdata, member, region="nope", progress=False)
    _tiles_on_spots(sdata, "S2", "S2_bad_tiles", size_um=80)
    tiles = sdata.tables["S2_bad_tiles_table"]
    tiles.uns["stpred"]["mpp"] = {}
    with pytest.raises(ValueError, match="microns per pixel"):
        stpred.tl.predict(sdata, member, region="S2_bad_tiles", progress=False)
    assert sdata.tables["S2_bad_tiles_table"].n_vars == 0
    geometry = member.info.pop("geometry")
    try:
        with pytest.raises(ValueError, match="Refit"):
            stpred.tl.predict(sdata, member, region="S2_bad_tiles", progress=False)
    finally:
        member.info["geometry"] = geometry


def test_hist_tiles_rebuild_embeddings_and_lattice():
    sdata = stpred.datasets.synthetic(n_sections=3, n_genes=30, seed=2, n_patients=1)
    stpred.pp.select_genes(sdata, n_top=10, sections=["S0", "S1"])
    stpred.pp.normalize(sdata)
    stpred.pp.extract_patches(sdata, size=32, context_size=None, progress=False)
    stpred.pp.embed(sdata, encoder="resnet18", width=8, progress=False)
    predictor = stpred.tl.fit(sdata, "hist", train=["S0", "S1"], max_epochs=1, progress=False, width=16, heads=2)
    geometry = predictor.info["geometry"]
    assert geometry["embedding"]["encoder"] == "resnet18"
    assert geometry["lattice_unit_um"] == 80.0
    assert len(predictor.model.dropout_modules()) > 1  # input dropout and the refinement layers
    ids = _tiles_on_spots(sdata, "S2", "S2_hist_tiles", size_um=80)
    stpred.tl.predict(sdata, predictor, region="S2_hist_tiles", key_added="hist", progress=False)
    tiles = sdata.tables["S2_hist_tiles_table"]
    spot_pred, _ = _spot_predictions(sdata, predictor, ids)
    np.testing.assert_allclose(tiles.layers["hist"], spot_pred, rtol=1e-4, atol=1e-4)
    assert "hist_ood" in tiles.obs
    # tiles far denser than the training lattice: refused by stpred, naming the stride to use
    stpred.pp.tile(sdata, image_key="S2_hne", size_um=20, tissue=False, mpp=1.0, key_added="S2_dense")
    with pytest.raises(ValueError, match=r"stride_um=80"):
        stpred.tl.predict(sdata, predictor, region="S2_dense", key_added="dense", progress=False)
