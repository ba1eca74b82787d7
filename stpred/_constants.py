"""Names shared across the package: tables, layers, batch keys."""

from __future__ import annotations

#: Raw-count table written by the readers (all genes).
RAW_TABLE = "table"
#: Table created by :func:`stpred.pp.select_genes` (selected genes, targets, predictions).
STPRED_TABLE = "stpred"
#: Layer written by :func:`stpred.pp.normalize`.
TARGET_LAYER = "target"
#: Key under ``uns`` where stpred records provenance.
UNS_KEY = "stpred"
#: Key under ``uns["stpred"]`` of a table made by :func:`stpred.pp.tile` (how the tiles were made, their image).
TILES_KEY = "tiles"

REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
SECTION_KEY = "section"
PATIENT_KEY = "patient"
SPATIAL_KEY = "spatial"

#: ImageNet channel means of images scaled to [0, 1] (torchvision, timm and UNI use these).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations of images scaled to [0, 1].
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Microns between neighbouring spot centres.
LEGACY_ST_PITCH_UM = 200.0
VISIUM_PITCH_UM = 100.0
#: Spot diameters in microns.
LEGACY_ST_SPOT_DIAMETER_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0


def image_key(section: str) -> str:
    """Name of the H&E image element of ``section``."""
    return f"{section}_hne"


def shapes_key(section: str) -> str:
    """Name of the spot-circle shapes element of ``section``."""
    return f"{section}_spots"


def prediction_layer(model: str) -> str:
    """Default layer name for predictions of ``model``."""
    return f"stpred_{model}"


class BatchKeys:
    """Keys of the batch dictionaries the engine hands to a model.

    Attributes
    ----------
    SPOT
        ``uint8`` spot crops, ``(B, 3, S, S)``.
    CONTEXT
        ``uint8`` context crops, ``(B, 3, C, C)``.
    EMBEDDING
        ``float`` per-spot embeddings, ``(N, D)``.
    COORDS
        ``long`` integer lattice indices, ``(N, 2)`` as (x, y).
    TARGET
        ``float`` normalised expression, ``(B, G)``.
    SLIDE
        ``long`` slide (section) index of each spot, ``(B,)``.
    """

    SPOT = "spot"
    CONTEXT = "context"
    EMBEDDING = "embedding"
    COORDS = "coords"
    TARGET = "target"
    SLIDE = "slide"
