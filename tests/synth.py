"""Test helpers: small synthetic georeferenced rasters and tiny fixed-kernel models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
import toy_models  # noqa: F401  (registers the conv-segmentor / conv-refiner architectures)
from rasterio.transform import from_origin

from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.config import SamplingConfig
from idgbr_geo.registry import save_model


def write_raster(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32633",
                 res: float = 0.3, nodata: float | None = None, origin=(500000.0, 4000000.0),
                 **profile) -> Path:
    """Write (bands, H, W) ``data`` as a GeoTIFF with a north-up transform."""
    if data.ndim == 2:
        data = data[None]
    kw = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
              dtype=data.dtype, transform=from_origin(origin[0], origin[1], res, res))
    if crs is not None:
        kw["crs"] = crs
    if nodata is not None:
        kw["nodata"] = nodata
    kw.update(profile)
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
    return path


def write_gcp_raster(path, data: np.ndarray, gsd: float = 0.25, n_points: int = 4):
    """A raster georeferenced by ground control points only (no geotransform, no CRS on
    its grid), as satellite scenes before orthorectification arrive."""
    from rasterio.control import GroundControlPoint

    h, w = data.shape[1:]
    corners = [(0, 0), (0, w), (h, 0), (h, w)][:n_points]
    points = [GroundControlPoint(r, c, 500000 + c * gsd, 100000 - r * gsd)
              for r, c in corners]
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=data.shape[0],
                       dtype=data.dtype, gcps=points, crs="EPSG:32636") as ds:
        ds.write(data)
    return path


def write_rpc_raster(path: Path, data: np.ndarray, gsd: float = 0.5, lat: float = 10.0
                     ) -> Path:
    """A raster georeferenced by RPCs only (no geotransform, no GCPs), as satellite scenes
    before orthorectification arrive: a linear sensor model with ``gsd`` m pixels."""
    import math

    from rasterio.rpc import RPC

    h, w = data.shape[1:]
    coeff = [0.0] * 20
    line_num, samp_num, den = list(coeff), list(coeff), list(coeff)
    line_num[2], samp_num[1], den[0] = -1.0, 1.0, 1.0  # row ~ -latitude, column ~ longitude
    rpc = RPC(height_off=0.0, height_scale=100.0, lat_off=lat,
              lat_scale=(h / 2) * gsd / 110574.0, line_den_coeff=den, line_num_coeff=line_num,
              line_off=h / 2, line_scale=h / 2, long_off=30.0,
              long_scale=(w / 2) * gsd / (111320.0 * math.cos(math.radians(lat))),
              samp_den_coeff=den, samp_num_coeff=samp_num, samp_off=w / 2, samp_scale=w / 2)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=data.shape[0],
                       dtype=data.dtype, rpcs=rpc) as ds:
        ds.write(data)
    return path


def synthetic_scene(h: int, w: int, bands: int = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """Blocky 'buildings' on a textured background: real edges for the models to find."""
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 90, size=(bands, h, w)).astype(np.float32)
    for _ in range(max(1, h * w // 4000)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        hh, ww = rng.integers(4, 30, size=2)
        img[:, y:y + hh, x:x + ww] = rng.integers(150, 250, size=(bands, 1, 1))
    return img.astype(dtype)


def conv_model(folder: Path, *, classes=("background", "building"), bands: int = 3,
               kernel: int = 5, gsd: float | None = 0.3, refiner: bool = True,
               tile_size: int = 96, overlap: int = 32, steps: int = 2, seed: int = 0,
               name: str = "toy", gsd_choices: list[float] | None = None,
               coarse_zooms: list[float] | None = None, edge_filter: bool = False) -> Path:
    """A tiny fixed-convolution segmentor (+ toy refiner) saved as card + safetensors
    (architectures of toy_models.py)."""
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    tensors = {"segmentor.weight": torch.randn(k, bands, kernel, kernel, generator=g) * 0.3,
               "segmentor.bias": torch.randn(k, generator=g) * 0.1}
    card = ModelCard(name=name, classes=list(classes), bands=bands,
                     band_names=[f"b{i}" for i in range(bands)],
                     normalization=Normalization(mean=[0.3] * bands, std=[0.2] * bands),
                     gsd=gsd, gsd_choices=gsd_choices, coarse_zooms=coarse_zooms,
                     edge_filter=edge_filter, tile_size=tile_size, overlap=overlap,
                     sampling=SamplingConfig(steps=steps), stride_multiple=8,
                     segmentor={"arch": "conv-segmentor"})
    if refiner:
        tensors["refiner.weight"] = torch.randn(k, bands + k, 3, 3, generator=g) * 0.3
        card.refiner = {"arch": "conv-refiner", "config": {"noise_scale": 0.05}}
    return save_model(card, tensors, folder)


def class_blobs(shape: tuple[int, int], seed: int, classes: int = 2,
                sigma: float = 4) -> np.ndarray:
    """Smooth random class map (uint8 ids 0..classes-1) with real boundaries, for metrics."""
    from scipy import ndimage

    r = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    edges = np.quantile(r, np.linspace(0, 1, classes + 1)[1:-1])
    return np.digitize(r, edges).astype(np.uint8)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b.c": value}, to compare metric results key by key."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def assert_same(a: dict, b: dict) -> None:
    """Two metric results agree key by key (floats to 1e-9 relative, the rest exactly)."""
    import pytest

    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        if isinstance(value, float):
            assert fb[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert fb[key] == value, key


def refiner_net(k: int = 2, **kw):
    """A seeded RefinerNet with non-zero weights everywhere, so every input matters."""
    from idgbr_geo.networks import RefinerNet

    torch.manual_seed(0)
    net = RefinerNet(num_classes=k, **kw).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net
