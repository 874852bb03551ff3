"""Writing results: class ids, confidence and probabilities of finished strips."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.enums import Compression
from synth import write_raster

from idgbr_geo.stitching import Strip
from idgbr_geo.writing import BLOCK, CHUNK_ROWS, NODATA, ResultWriter


@pytest.mark.parametrize(("k", "binary"), [(3, False), (2, True)])
def test_strips_are_written_as_ids_confidence_and_probabilities(tmp_path, k, binary):
    """Rows worked in chunks must give exactly what the whole strip gives, holes included."""
    height, width = BLOCK + 40, 70  # a whole block row, then a short last one
    assert BLOCK > CHUNK_ROWS  # so that a block row is worked in several chunks
    rng = np.random.default_rng(k)
    like = write_raster(tmp_path / "in.tif", np.zeros((3, height, width), np.uint8))
    probs = rng.dirichlet(np.ones(k), size=(height, width)).transpose(2, 0, 1).astype(np.float32)
    wsum = rng.uniform(0.5, 2.0, (height, width)).astype(np.float32)
    covered = rng.random((height, width)) > 0.1
    acc = (probs[1:] if binary else probs) * wsum
    classes = [f"c{i}" for i in range(k)]
    with rasterio.open(like) as src:
        w = ResultWriter(tmp_path / "out.tif", src, classes, ["#000000"] * k, confidence=True,
                         probabilities=tmp_path / "p.tif")
        for r0 in range(0, height, BLOCK):
            r1 = min(r0 + BLOCK, height)
            w.write(r0, r1, Strip(acc[:, r0:r1], wsum[r0:r1], covered[r0:r1], binary))
        w.close()
    with rasterio.open(tmp_path / "out.tif") as out, rasterio.open(tmp_path / "p.tif") as p:
        ids, conf, got_p = out.read(1), out.read(2), p.read()
        assert out.compression == Compression.deflate
    full = Strip(acc, wsum, covered, binary).probs  # the probabilities, not yet rounded
    np.testing.assert_array_equal(ids, np.where(covered, full.argmax(0), NODATA))
    np.testing.assert_array_equal(conf, np.where(covered, np.rint(full.max(0) * 255), 0))
    np.testing.assert_array_equal(got_p, np.where(covered, np.rint(full * 255), 0))
