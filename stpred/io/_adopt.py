"""Adopt a user's SpatialData or AnnData: find, once, each section's image, spots, scale and table rows.

One module answers "which image, which spots, which table, which section" for every public function, so that an
object read by :func:`spatialdata_io.visium` (or ``visium_hd``, or a scanpy/squidpy AnnData in the Visium layout)
works as it is, next to the objects of stpred's own readers, which are just one layout the rules recognise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import (
    PATIENT_KEY,
    RAW_TABLE,
    SECTION_KEY,
    SPATIAL_KEY,
    STPRED_TABLE,
    TILES_KEY,
    UNS_KEY,
    VISIUM_SPOT_DIAMETER_UM,
)
from .._constants import (
    image_key as stpred_image_key,
)
from .._provenance import plain

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Key under ``uns["stpred"]`` of the recorded layout.
LAYOUT_KEY = "layout"
#: Image names spatialdata-io gives a Visium section, in order of preference (finest first).
_VISIUM_SUFFIXES = ("_full_image", "_hires_image", "_lowres_image")
#: spatialdata-io's names of Visium HD bins (``square_008um``): the side in µm.
_BIN_NAME = re.compile(r"square_0*(\d+)um")
#: spatialdata-io's names of Xenium cell shapes (cells are pooled into pseudo-spots, not used as spots).
_XENIUM_CELLS = ("cell_circles", "cell_boundaries")


@dataclass(frozen=True)
class SectionLayout:
    """Where one section's data lives.

    Attributes
    ----------
    image
        Name of the image element (H&E) in ``sdata.images``.
    shapes
        Name of the shapes element holding the section's spots.
    coordinate_system
        Coordinate system shared by ``image`` and ``shapes``.
    mpp
        Microns per unit of the spot coordinates (``obsm["spatial"]`` of the ``stpred`` table), or ``None``.
    spot_radius
        Spot radius in spot-coordinate units, or ``None`` for shapes without a radius.
    image_scale
        Pixels of the image's finest level per spot-coordinate unit (1 for stpred's readers; the hires scale
        factor for a spatialdata-io Visium section shown on its hires image).
    """

    image: str
    shapes: str
    coordinate_system: str
    mpp: float | None
    spot_radius: float | None
    image_scale: float = 1.0


@dataclass(frozen=True)
class Layout:
    """What :func:`adopt` chose for an object: the raw-count table, the section column and each section's elements.

    Attributes
    ----------
    table_key
        Raw-count table in ``sdata.tables``.
    section_key
        ``obs`` column naming each row's section, or ``None`` when each annotated shapes element is a section
        (its rows are those with ``obs[region_key] == <shapes name>``).
    patient_key
        ``obs`` column naming each row's patient, or ``None`` (each section is its own patient).
    sections
        ``{section: SectionLayout}``, in section order.
    native
        ``True`` for the layout of stpred's readers (``obs["spatial"]`` already in image pixels).
    """

    table_key: str
    section_key: str | None
    patient_key: str | None
    sections: dict[str, SectionLayout]
    native: bool = False

    def to_uns(self) -> dict[str, Any]:
        """The layout as JSON-like values (what is recorded in ``uns["stpred"]["layout"]``)."""
        return plain(
            {
                "table_key": self.table_key,
                "section_key": self.section_key,
                "patient_key": self.patient_key,
                "native": self.native,
                "sections": {s: asdict(v) for s, v in self.sections.items()},
            }
        )

    @classmethod
    def from_uns(cls, entry: Mapping[str, Any]) -> Layout:
        """Rebuild a layout recorded by :meth:`to_uns`."""
        sections = {
            str(s): SectionLayout(
                image=str(v["image"]),
                shapes=str(v["shapes"]),
                coordinate_system=str(v["coordinate_system"]),
                mpp=None if v.get("mpp") is None else float(v["mpp"]),
                spot_radius=None if v.get("spot_radius") is None else float(v["spot_radius"]),
                image_scale=float(v.get("image_scale", 1.0)),
            )
            for s, v in dict(entry.get("sections", {})).items()
        }
        return cls(
            table_key=str(entry["table_key"]),
            section_key=entry.get("section_key"),
            patient_key=entry.get("patient_key"),
            sections=sections,
            native=bool(entry.get("native", False)),
        )

    def section_labels(self, table: AnnData) -> np.ndarray:
        """Section of every row of ``table`` (strings)."""
        if self.section_key is not None:
            return table.obs[self.section_key].astype(str).to_numpy()
        region_key = table_attrs(table)[1]
        return table.obs[region_key].astype(str).to_numpy()

    def patient_labels(self, table: AnnData, sections: np.ndarray) -> np.ndarray:
        """Patient of every row (the section itself without ``patient_key``)."""
        if self.patient_key is None:
            return sections
        return table.obs[self.patient_key].astype(str).to_numpy()


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def table_attrs(table: AnnData) -> tuple[list[str], str, str] | None:
    """``(regions, region_key, instance_key)`` of a table that annotates shapes, else ``None``."""
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    if not attrs or attrs.get(TableModel.REGION_KEY) is None:
        return None
    region = attrs[TableModel.REGION_KEY]
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    return regions, str(attrs[TableModel.REGION_KEY_KEY]), str(attrs[TableModel.INSTANCE_KEY])


def _labels_or_none(layout: Layout, table: AnnData) -> np.ndarray:
    try:
        return layout.section_labels(table)
    except (KeyError, TypeError):
        return np.array([], dtype=str)


def _per_section(value: str | Mapping[str, str] | None, section: str, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return None if section not in value else str(value[section])
    msg = f"Expected `{name}` to be an element name or a dict {{section: name}}, found {type(value).__name__}."
    raise TypeError(msg)


def _coordinate_systems(element: Any) -> set[str]:
    from spatialdata.transformations import get_transformation

    return set(get_transformation(element, get_all=True))


def _choose_table(sdata: SpatialData, table_key: str | None) -> str:
    tables = sorted(sdata.tables)
    if table_key is not None:
        if table_key not in sdata.tables:
            msg = f"No table {table_key!r} in `sdata.tables`; found {tables}. Pass `table_key=` naming the raw counts."
            raise KeyError(msg)
        return table_key
    candidates = [t for t in tables if t != STPRED_TABLE]
    adopted = [t for t in candidates if dict(sdata.tables[t].uns.get(UNS_KEY, {})).get(LAYOUT_KEY)]
    if len(adopted) == 1:
        return adopted[0]  # the table `adopt` recorded a layout in
    if RAW_TABLE in candidates:
        return RAW_TABLE
    if len(candidates) == 1:
        return candidates[0]
    msg = (
        f"Cannot tell which table holds the raw counts: found {tables}. "
        "Pass `table_key=` to `stpred.io.adopt(sdata, table_key=...)`."
    )
    raise ValueError(msg)


def raw_table_key(sdata: SpatialData) -> str:
    """The raw-count table of ``sdata``.

    The one :func:`adopt` recorded a layout in, else ``"table"``, else the only table other than ``"stpred"``; a
    :class:`ValueError` lists the tables when that is ambiguous.
    """
    return _choose_table(sdata, None)


def _choose_image(sdata: SpatialData, section: str, shapes_name: str, shapes: Any, given: str | None) -> tuple[str, str]:
    """The image of a section and the coordinate system it shares with the spots."""
    cs_shapes = _coordinate_systems(shapes)
    if given is not None:
        if given not in sdata.images:
            msg = f"No image {given!r} in `sdata.images`; found {sorted(sdata.images)}. Pass an existing `image_key`."
            raise KeyError(msg)
        common = cs_shapes & _coordinate_systems(sdata.images[given])
        if not common:
            msg = (
                f"Image {given!r} and the spots {shapes_name!r} of section {section!r} share no coordinate system "
                f"(spots: {sorted(cs_shapes)}, image: {sorted(_coordinate_systems(sdata.images[given]))}); add the "
                "alignment with `spatialdata.transformations.set_transformation`."
            )
            raise ValueError(msg)
        return given, _pick_cs(common, section, shapes_name)
    native = stpred_image_key(section)
    if native in sdata.images and cs_shapes & _coordinate_systems(sdata.images[native]):
        return native, _pick_cs(cs_shapes & _coordinate_systems(sdata.images[native]), section, shapes_name)
    candidates = sorted(k for k, im in sdata.images.items() if cs_shapes & _coordinate_systems(im))
    if not candidates:
        msg = (
            f"No image shares a coordinate system with the spots {shapes_name!r} of section {section!r} "
            f"(images: {sorted(sdata.images)}; spots in {sorted(cs_shapes)}). Add the H&E image aligned to the "
            "spots, or pass `image_key=` to `stpred.io.adopt`."
        )
        raise ValueError(msg)
    if len(candidates) > 1:
        for suffix in _VISIUM_SUFFIXES:  # a spatialdata-io Visium section: its full-res, else hires, else lowres
            hits = [k for k in candidates if k.endswith(suffix)]
            if len(hits) > 1:
                hits = [k for k in hits if k.startswith((shapes_name, section))] or hits
            if len(hits) == 1:
                candidates = hits
                break
    if len(candidates) > 1:
        msg = (
            f"Section {section!r} has several images aligned to its spots and none is named: {candidates}. Pass "
            f"`image_key=` (one name, or a dict {{section: name}}) to `stpred.io.adopt(sdata, image_key=...)`."
        )
        raise ValueError(msg)
    image = candidates[0]
    return image, _pick_cs(cs_shapes & _coordinate_systems(sdata.images[image]), section, shapes_name)


def _pick_cs(common: set[str], section: str, shapes_name: str) -> str:
    for preferred in (section, shapes_name):
        if preferred in common:
            return preferred
    return sorted(common)[0]


def _image_pixels_per_unit(shapes: Any, image: Any, cs: str) -> float:
    """Pixels of the image's finest level per spot-coordinate unit (through the shared coordinate system ``cs``)."""
    from spatialdata.transformations import Sequence as TSequence
    from spatialdata.transformations import get_transformation

    from .._pyramid import pyramid_levels

    level = pyramid_levels(image)[0]
    chain = TSequence(
        [get_transformation(shapes, to_coordinate_system=cs), get_transformation(level, to_coordinate_system=cs).inverse()]
    )
    matrix = np.asarray(chain.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    return math.sqrt(abs(float(np.linalg.det(matrix[:2, :2]))))


def spot_centres(sdata: SpatialData, table: AnnData, rows: np.ndarray, shapes_name: str) -> np.ndarray:
    """Centres ``(len(rows), 2)`` of the spots of ``rows`` in the coordinates of ``shapes_name``.

    Raises a :class:`ValueError` for spots without coordinates (ids missing from the shapes, empty or NaN geometry).
    """
    attrs = table_attrs(table)
    instance_key = attrs[2]
    shapes = sdata.shapes[shapes_name]
    ids = table.obs[instance_key].to_numpy()[rows]
    idx = shapes.index.get_indexer(ids)
    if (idx < 0).any():
        missing = ids[idx < 0][:3].tolist()
        msg = (
            f"{int((idx < 0).sum())} of {len(ids)} spots have no coordinates: their `obs[{instance_key!r}]` "
            f"(first: {missing}) is not in the index of shapes {shapes_name!r}. Drop those rows from the table or "
            "add their shapes."
        )
        raise ValueError(msg)
    geom = shapes.geometry.iloc[idx]
    empty = geom.is_empty.to_numpy() | geom.isna().to_numpy()
    xy = np.full((len(ids), 2), np.nan)
    ok = ~empty
    if ok.any():
        kept = geom[ok]
        if not (kept.geom_type == "Point").all():
            kept = kept.centroid  # polygons (square bins, cells): their centre
        xy[ok] = np.c_[kept.x.to_numpy(), kept.y.to_numpy()]
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        msg = (
            f"{int(bad.sum())} of {len(ids)} spots of shapes {shapes_name!r} have no coordinates (empty or NaN "
            f"geometry; first: {table.obs_names[rows[bad]][:3].tolist()}). Drop those rows from the table."
        )
        raise ValueError(msg)
    return xy


# --------------------------------------------------------------------------------------------------------------------
# resolution


def resolve(
    sdata: SpatialData,
    *,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Mapping[str, str] | None = None,
    section_key: str | None = None,
    patient_key: str | None = None,
    spot_diameter_um: float | None = None,
) -> Layout:
    """Resolve the layout of ``sdata`` without writing anything (see :func:`adopt` for the rules).

    A layout recorded by :func:`adopt` in the table's ``uns["stpred"]["layout"]`` is returned as it is when no
    argument asks for something else.
    """
    from .._validate import check_positive

    key = _choose_table(sdata, table_key)
    table = sdata.tables[key]
    recorded = dict(table.uns.get(UNS_KEY, {})).get(LAYOUT_KEY)
    asked = (image_key, shapes_key, section_key, patient_key, spot_diameter_um)
    if recorded:
        layout = Layout.from_uns(recorded)
        fresh = layout.table_key == key and set(_labels_or_none(layout, table)) == set(layout.sections)
        if fresh and all(v is None for v in asked):
            return layout
        # new arguments, or rows added since (e.g. a concatenated section): keep what was named, resolve the rest
        image_key = {s: v.image for s, v in layout.sections.items()} if image_key is None else image_key
        section_key = layout.section_key if section_key is None else section_key
        patient_key = layout.patient_key if patient_key is None else patient_key
    if spot_diameter_um is not None:
        check_positive(float(spot_diameter_um), name="spot_diameter_um")
    attrs = table_attrs(table)
    if attrs is None:
        msg = (
            f"Table {key!r} annotates no shapes (no `uns['spatialdata_attrs']` region), so its rows have no spots "
            "to crop. Link it to the spot shapes with `spatialdata.models.TableModel.parse(table, region=<shapes "
            "name>, region_key='region', instance_key='spot_id')` (the region column naming the shapes element and "
            "the instance column the shape index), or read the data with an `stpred.io` reader."
        )
        raise ValueError(msg)
    regions, region_key, _ = attrs
    absent = [r for r in regions if r not in sdata.shapes]
    annotated = [r for r in regions if r in sdata.shapes]
    if not annotated:
        msg = (
            f"Table {key!r} annotates the regions {regions}, none of which is a shapes element (shapes: "
            f"{sorted(sdata.shapes)}; labels are not spots). Link the table to the spot shapes with "
            "`spatialdata.models.TableModel.parse`."
        )
        raise ValueError(msg)
    cells = sorted(set(annotated) & set(_XENIUM_CELLS))
    if cells and spot_diameter_um is None and SECTION_KEY not in table.obs:
        msg = (
            f"Table {key!r} annotates Xenium cells ({cells}), not spots. Pool them into pseudo-spots on the H&E with "
            "`stpred.io.xenium_pseudospots(sdata, spot_size_um=100, section=...)` and use that object; to treat "
            "each cell as a unit anyway, pass its diameter as `stpred.io.adopt(sdata, spot_diameter_um=...)`."
        )
        raise ValueError(msg)
    obs_region = table.obs[region_key].astype(str).to_numpy()
    native = SECTION_KEY in table.obs and section_key in (None, SECTION_KEY)
    if section_key is None and SECTION_KEY in table.obs:
        section_key = SECTION_KEY
    if section_key is not None and section_key not in table.obs:
        msg = f"No column {section_key!r} in `obs` of table {key!r}; found {list(table.obs.columns)}. Pass `section_key=`."
        raise KeyError(msg)
    if patient_key is None and native and PATIENT_KEY in table.obs:
        patient_key = PATIENT_KEY
    if patient_key is not None and patient_key not in table.obs:
        msg = f"No column {patient_key!r} in `obs` of table {key!r}; found {list(table.obs.columns)}. Pass `patient_key=`."
        raise KeyError(msg)
    if section_key is None:
        labels = obs_region
    else:
        col = table.obs[section_key]
        if col.isna().any():
            msg = f"`obs[{section_key!r}]` of table {key!r} has {int(col.isna().sum())} missing values; every row needs a section."
            raise ValueError(msg)
        labels = col.astype(str).to_numpy()
    if isinstance(table.obs.get(section_key), pd.Series) and isinstance(table.obs[section_key].dtype, pd.CategoricalDtype):
        present = set(labels)
        sections = [str(c) for c in table.obs[section_key].cat.categories if str(c) in present]
    else:
        sections = [str(s) for s in pd.unique(labels)]

    uns = dict(table.uns.get(UNS_KEY, {}))
    known_mpp = {str(k): float(v) for k, v in dict(uns.get("mpp", {})).items()}
    known_diam = {str(k): float(v) for k, v in dict(uns.get("spot_diameter_um", {})).items()}
    out: dict[str, SectionLayout] = {}
    for section in sections:
        rows = np.flatnonzero(labels == section)
        in_regions = pd.unique(obs_region[rows])
        wanted = _per_section(shapes_key, section, "shapes_key")
        if wanted is not None:
            if wanted not in sdata.shapes:
                msg = f"No shapes {wanted!r} in `sdata.shapes`; found {sorted(sdata.shapes)}. Pass an existing `shapes_key`."
                raise KeyError(msg)
            if set(in_regions) != {wanted}:
                msg = (
                    f"The rows of section {section!r} annotate {sorted(map(str, in_regions))}, not the shapes "
                    f"{wanted!r} named by `shapes_key`; the table's region column {region_key!r} decides."
                )
                raise ValueError(msg)
        if len(in_regions) != 1:
            msg = (
                f"The rows of section {section!r} annotate several shapes elements {sorted(map(str, in_regions))}; "
                f"stpred needs one spot element per section. Pass `section_key=` naming the obs column that splits them."
            )
            raise ValueError(msg)
        shapes_name = str(in_regions[0])
        if shapes_name in absent:
            msg = f"Section {section!r} annotates {shapes_name!r}, which is not in `sdata.shapes` ({sorted(sdata.shapes)})."
            raise KeyError(msg)
        shapes = sdata.shapes[shapes_name]
        image, cs = _choose_image(sdata, section, shapes_name, shapes, _per_section(image_key, section, "image_key"))
        scale = _image_pixels_per_unit(shapes, sdata.images[image], cs)
        radius, default_um = None, VISIUM_SPOT_DIAMETER_UM
        if "radius" in shapes.columns:
            r = np.asarray(shapes["radius"], dtype=np.float64)
            r = r[np.isfinite(r)]
            radius = float(np.median(r)) if len(r) else None
        elif len(shapes) and (shapes.geometry.geom_type == "Polygon").all():
            # square bins (spatialdata_io.visium_hd): half the side; the side in µm is in the element's name
            radius = float(np.median(np.sqrt(shapes.geometry.area.to_numpy()))) / 2.0
            match = _BIN_NAME.search(shapes_name) or _BIN_NAME.search(key)
            default_um = float(match.group(1)) if match else None
        mpp = known_mpp.get(section)
        if (mpp is None or not native) and radius is not None and radius > 0:
            diameter_um = spot_diameter_um or known_diam.get(section) or default_um
            mpp = None if diameter_um is None else float(diameter_um) / (2.0 * radius)
        out[section] = SectionLayout(
            image=image, shapes=shapes_name, coordinate_system=cs, mpp=mpp, spot_radius=radius, image_scale=scale
        )
    return Layout(table_key=key, section_key=section_key, patient_key=patient_key, sections=out, native=native)


def adopt(
    sdata: SpatialData | AnnData,
    *,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Mapping[str, str] | None = None,
    section_key: str | None = None,
    patient_key: str | None = None,
    spot_diameter_um: float | None = None,
) -> Layout:
    """Find each section's image, spots and scale in a SpatialData or AnnData object, and record the choice.

    Call it once on an object that stpred's rules cannot read alone (several images per section and none
    named, several tables, a section column other than ``obs["section"]``); every later call reads what was
    recorded. Objects from stpred's readers and from :func:`spatialdata_io.visium` / ``visium_hd`` need no call:
    :func:`stpred.pp.select_genes` resolves them itself. Nothing is renamed or deleted.

    Rules, in order:

    - **table**: ``table_key``; else the one table a layout was recorded in; else ``"table"``; else the only
      table other than ``"stpred"``. It must annotate shapes (spatialdata's ``region``/``region_key``/``instance_key``).
    - **sections**: the values of ``obs[section_key]``; else of ``obs["section"]`` (stpred's readers); else each
      annotated shapes element is one section (named like it), as :func:`spatialdata_io.visium` writes one
      element per library.
    - **spots**: the shapes element the section's rows annotate (``shapes_key`` only checks it).
    - **image**: ``image_key``; else ``"{section}_hne"`` (stpred's readers); else the only image sharing a
      coordinate system with the spots; among several, spatialdata-io's Visium names in the order
      ``*_full_image``, ``*_hires_image``, ``*_lowres_image``; otherwise a :class:`ValueError` listing them.
    - **scale**: microns per spot-coordinate unit from ``uns["stpred"]["mpp"]`` (stpred's readers), else from
      the spot radius (shapes column ``radius``) and the spot diameter in µm (``spot_diameter_um``, default
      55 µm, Visium's), or for square bins (polygons) from their side and the bin size in µm of
      spatialdata-io's name (``square_016um``); the image's own scale follows from the transformations.

    Parameters
    ----------
    sdata
        A SpatialData object, or an AnnData in scanpy's Visium layout (``obsm["spatial"]`` in full-resolution
        pixels, ``uns["spatial"][library]["images"]`` and ``["scalefactors"]``).
    table_key
        Raw-count table.
    image_key
        Image element for every section, or ``{section: name}``.
    shapes_key
        Shapes element of the spots (checked against the table's regions), or ``{section: name}``.
    section_key
        ``obs`` column naming each spot's section (for an AnnData: the library column, squidpy's
        ``library_key``).
    patient_key
        ``obs`` column naming each spot's patient (default: each section is a patient).
    spot_diameter_um
        Physical spot diameter (default 55 µm) used to derive microns per pixel from the spot radius.

    Returns
    -------
    The :class:`~stpred.io.Layout`, also recorded (JSON-like) in ``uns["stpred"]["layout"]`` of the raw-count
    table (of the AnnData itself for an AnnData). On error nothing is written.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    >>> layout = stpred.io.adopt(sdata)
    >>> layout.sections["S0"].image, layout.sections["S0"].shapes
    ('S0_hne', 'S0_spots')
    """
    from anndata import AnnData

    from ._anndata import LIBRARY_KEY, anndata_view

    args = {
        "image_key": image_key,
        "shapes_key": shapes_key,
        "section_key": section_key,
        "patient_key": patient_key,
        "spot_diameter_um": spot_diameter_um,
    }
    if isinstance(sdata, AnnData):
        view = anndata_view(sdata, section_key=section_key)
        args["section_key"] = None  # the view's sections are the libraries (its shapes elements)
        layout = resolve(view, table_key=RAW_TABLE, **args)
        entry = dict(sdata.uns.get(UNS_KEY, {}))
        entry[LAYOUT_KEY] = layout.to_uns()
        if section_key is not None:
            entry[LIBRARY_KEY] = section_key
        sdata.uns[UNS_KEY] = entry
        return layout
    layout = resolve(sdata, table_key=table_key, **args)
    table = sdata.tables[layout.table_key]
    uns = table.uns.get(UNS_KEY)
    if uns is None:
        table.uns[UNS_KEY] = uns = {}
    uns[LAYOUT_KEY] = layout.to_uns()
    return layout


def recorded_layout(table: AnnData) -> Layout | None:
    """The layout recorded in ``uns["stpred"]["layout"]`` of a table, or ``None``."""
    entry = dict(table.uns.get(UNS_KEY, {})).get(LAYOUT_KEY)
    return Layout.from_uns(entry) if entry else None


def section_image_key(table: AnnData, section: str) -> str:
    """Image element of ``section`` of an stpred table.

    The recorded layout's image, else the image a tiles table was cut from (:func:`stpred.pp.tile` records it),
    else stpred's ``"{section}_hne"``.
    """
    layout = recorded_layout(table)
    if layout is not None and section in layout.sections:
        return layout.sections[section].image
    tiles = dict(table.uns.get(UNS_KEY, {})).get(TILES_KEY)
    if isinstance(tiles, Mapping) and tiles.get("image_key"):
        return str(tiles["image_key"])
    return stpred_image_key(section)


def image_section_mpp(sdata: SpatialData, image_key: str, section: str | None = None) -> tuple[str, float, str] | None:
    """The adopted section an image shows, and the µm per pixel of its finest level, from a recorded layout.

    Searches the layouts recorded by :func:`adopt` in the tables for the section whose image is ``image_key``,
    else the one section whose coordinate system the image shares (a Visium section's lowres image beside its
    hires one); ``section`` restricts the search to that section. The µm per pixel come through the image's own
    transformation: µm per spot-coordinate unit divided by image pixels per spot-coordinate unit, so a hires and
    a lowres image of one section each get their own.

    Returns
    -------
    ``(section, mpp, source)``, or ``None`` when no recorded layout places the image with a known µm per pixel.
    """
    from spatialdata.transformations import get_transformation

    image = sdata.images[image_key]
    systems = set(get_transformation(image, get_all=True))
    exact, shared = [], []
    for name, table in sdata.tables.items():
        layout = recorded_layout(table)
        if layout is None:
            continue
        for sec, entry in layout.sections.items():
            usable = entry.mpp is not None and entry.shapes in sdata.shapes and entry.coordinate_system in systems
            if not usable or (section is not None and sec != section):
                continue
            (exact if entry.image == image_key else shared).append((name, sec, entry))
    candidates = exact or (shared if len({sec for _, sec, _ in shared}) == 1 else [])
    if not candidates:
        return None
    name, sec, entry = candidates[0]
    pixels_per_unit = _image_pixels_per_unit(sdata.shapes[entry.shapes], image, entry.coordinate_system)
    source = f"tables[{name!r}].uns['stpred']['layout'] (section {sec!r}) through the image's transformation"
    return sec, float(entry.mpp) / pixels_per_unit, source


def section_image_scale(table: AnnData, section: str) -> float:
    """Image pixels (finest level) per spot-coordinate unit of ``section`` (1 without a recorded layout)."""
    layout = recorded_layout(table)
    if layout is not None and section in layout.sections:
        return layout.sections[section].image_scale
    return 1.0


def _all_centres(sdata: SpatialData, table: AnnData, layout: Layout, labels: np.ndarray) -> np.ndarray:
    """Spot centres of every row in the coordinates of its shapes element."""
    xy = np.empty((table.n_obs, 2), dtype=np.float64)
    for section, sec in layout.sections.items():
        rows = np.flatnonzero(labels == section)
        xy[rows] = spot_centres(sdata, table, rows, sec.shapes)
    return xy


def stpred_table(sdata: SpatialData, layout: Layout, genes: np.ndarray) -> AnnData:
    """The unparsed ``stpred`` table of ``genes`` (names in the raw table).

    Dense ``float32`` counts, the raw ``obs`` plus ``obs["section"]``/``obs["patient"]``, ``obsm["spatial"]`` in pixels of each section's image, and
    ``uns["stpred"]`` = the raw table's plus the layout and the microns per pixel.
    """
    import copy

    from anndata import AnnData
    from scipy import sparse

    raw = sdata.tables[layout.table_key]
    gene_idx = raw.var_names.get_indexer(genes)
    X = raw.X[:, gene_idx]
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    var = raw.var.iloc[gene_idx].copy()
    var.index = pd.Index(np.asarray(genes).astype(str))
    obs = raw.obs.copy()
    labels = layout.section_labels(raw)
    if not layout.native:
        obs[SECTION_KEY] = pd.Categorical(labels, categories=list(layout.sections))
        patients = layout.patient_labels(raw, labels)
        obs[PATIENT_KEY] = pd.Categorical(patients, categories=[str(p) for p in pd.unique(patients)])
    adata = AnnData(X=np.ascontiguousarray(X, dtype=np.float32), obs=obs, var=var)
    if layout.native and SPATIAL_KEY in raw.obsm:
        adata.obsm[SPATIAL_KEY] = np.asarray(raw.obsm[SPATIAL_KEY], dtype=np.float64).copy()
    else:
        adata.obsm[SPATIAL_KEY] = _all_centres(sdata, raw, layout, labels)
    uns = copy.deepcopy(dict(raw.uns.get(UNS_KEY, {})))
    mpp = {str(k): float(v) for k, v in dict(uns.get("mpp", {})).items()}
    for section, sec in layout.sections.items():
        if sec.mpp is not None and (section not in mpp or not layout.native):
            mpp[section] = float(sec.mpp)
    if mpp:
        uns["mpp"] = mpp
    uns[LAYOUT_KEY] = layout.to_uns()
    adata.uns[UNS_KEY] = uns
    return adata


__all__ = ["Layout", "SectionLayout", "adopt", "resolve"]
