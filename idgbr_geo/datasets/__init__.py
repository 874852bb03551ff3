"""Turn user training data into compact chip arrays (.npz) for the training loops.

The training loops (``idgbr_geo.training``) read only numpy arrays, so that they run on a GPU
machine without the geospatial stack. This module does all the geospatial work up front:
it finds image/label pairs (label rasters, vector labels rasterized onto each image grid, or
a torchgeo dataset on disk), resamples every scene to one *ground* sample distance (GSD, in
metres on the ground, whatever the CRS: projected, Web-Mercator or geographic), cuts chips
with a stride, and marks everything that must not be learned from as label 255 (image
nodata, pixels outside the label footprint, classes the user chose to ignore).

The .npz keys are fixed by the training contract: ``images`` (N, bands, T, T) uint8/uint16,
``labels`` (N, T, T) uint8 with 255 = ignore, ``classes`` (str array), ``gsd`` (float,
metres; NaN when unknown), ``source`` (provenance), ``scene`` (N,) str.
"""

from __future__ import annotations

from ..rasters import pixel_ground_size
from .chips import (
    IGNORE,
    ChipSet,
    LabelRules,
    chip_origins,
    parse_label_map,
    resolve_classes,
    split_by_scene,
)
from .from_torchgeo import chips_from_torchgeo
from .rasters import (
    chips_from_rasters,
    chips_from_vectors,
    find_images,
    pair_by_name,
    pair_groups,
    read_vector_labels,
)

__all__ = [
    "IGNORE", "ChipSet", "LabelRules", "chip_origins", "chips_from_rasters",
    "chips_from_torchgeo", "chips_from_vectors", "find_images", "pair_by_name",
    "pair_groups", "parse_label_map", "pixel_ground_size", "read_vector_labels",
    "resolve_classes", "split_by_scene",
]
