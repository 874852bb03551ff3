"""Prepacked oneDNN convolutions (idgbr_geo.packing): in bfloat16 the same numbers as the
plain convolution and activation, for the bundled models too, in float32 close to them and
the same for any number of threads; the plain path where the packed one does not apply
(gradients, no usable op in that dtype: bfloat16 on CPUs without AVX-512)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import rasterio
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import idgbr_geo.packing as packing
from idgbr_geo.networks import fuse_batchnorm
from idgbr_geo.packing import PackedConv2d, pack_convolutions
from idgbr_geo.predict import predict_windows
from idgbr_geo.registry import load_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gorinchem_rgb_025m.tif"
needs_packing = pytest.mark.skipif(not packing.usable(torch.float32),
                                   reason="this PyTorch lacks the oneDNN ops")
needs_bf16_packing = pytest.mark.skipif(
    not packing.usable(torch.bfloat16),
    reason="oneDNN packs no bfloat16 weights on this CPU (no AVX-512)")


def _bf16_if_packable(bfloat16: bool) -> None:
    if bfloat16 and not packing.usable(torch.bfloat16):
        pytest.skip("oneDNN packs no bfloat16 weights on this CPU (no AVX-512)")


def _conv(cin: int, cout: int, *, stride: int = 1, groups: int = 1, bias: bool = True,
          seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=bias).eval()


@needs_packing
@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.ReLU6()])
@pytest.mark.parametrize("bfloat16", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_packed_convolution_gives_the_plain_numbers(act, bfloat16, layout):
    _bf16_if_packable(bfloat16)
    conv = _conv(8, 16, stride=2, groups=2)
    packed = PackedConv2d(conv, act)
    plain = nn.Sequential(conv, act or nn.Identity())
    x = (torch.randn(2, 8, 21, 34) * 4).contiguous(memory_format=layout)
    # bfloat16: bit for bit; float32: eager PyTorch may take another kernel
    same = torch.equal if bfloat16 else (
        lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        got, want = packed(x), plain(x)
        assert got.dtype == want.dtype == (torch.bfloat16 if bfloat16 else torch.float32)
        assert same(got, want)
        if act is not None:
            assert got.min() == 0 and (act.__class__ is nn.ReLU or got.max() <= 6)
        # another shape gets its own packed weights; the first ones stay
        y = torch.randn(1, 8, 16, 16).contiguous(memory_format=layout)
        assert same(packed(y), plain(y))
    assert len(packed._packed) == 2


@needs_packing
@pytest.mark.parametrize("bfloat16", [False, True])
def test_a_packed_convolution_gives_the_same_numbers_on_any_number_of_threads(bfloat16):
    """The 1x1 convolutions of an EfficientNet block, which eager PyTorch computes in
    float32 as a matrix product whose sums are split by thread."""
    _bf16_if_packable(bfloat16)
    torch.manual_seed(3)
    packed = PackedConv2d(nn.Conv2d(240, 40, 1).eval())
    x = torch.randn(1, 240, 64, 64).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    outs = []
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=bfloat16):
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(packed(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_packing
def test_packed_weights_follow_a_change_of_the_weights():
    conv = _conv(4, 4, bias=False)
    packed = PackedConv2d(conv)
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        before = packed(x)
        conv.weight.mul_(2)  # in place: a new version of the same tensor
        assert torch.equal(packed(x), 2 * before)  # (a power of two: exact in bfloat16)
    assert len(packed._packed) == 2


def test_the_plain_path_runs_with_gradients_and_where_packing_is_unusable(monkeypatch):
    conv = _conv(3, 5)
    packed = PackedConv2d(conv, nn.ReLU6())
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    out = packed(x)  # gradients wanted: the plain convolution
    out.sum().backward()
    assert x.grad is not None and not packed._packed
    monkeypatch.setattr(packing, "_usable", {torch.float32: False, torch.bfloat16: False})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(packed(x), F.hardtanh(conv(x), 0.0, 6.0))
    with torch.no_grad():
        assert torch.equal(packed(x), F.hardtanh(conv(x), 0.0, 6.0))
    assert not packed._packed


def test_each_dtype_is_checked_on_its_own(monkeypatch):
    """A CPU without AVX-512 packs no bfloat16 weights: float32 still packs (its numbers
    do not depend on the threads), bfloat16 runs the plain convolution."""
    conv = _conv(3, 5)
    packed = PackedConv2d(conv, nn.ReLU6())
    x = torch.randn(1, 3, 9, 9)
    monkeypatch.setattr(packing, "_usable", {torch.bfloat16: False})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(packed(x), F.hardtanh(conv(x), 0.0, 6.0))
    assert not packed._packed
    if packing.usable(torch.float32):  # probed now, bfloat16's answer kept
        with torch.no_grad():
            torch.testing.assert_close(packed(x), F.hardtanh(conv(x), 0.0, 6.0),
                                       rtol=1e-5, atol=1e-6)
        assert [k[0] for k in packed._packed] == [torch.float32]
    assert packing._usable[torch.bfloat16] is False


@needs_packing
def test_the_packed_weights_of_a_convolution_are_bounded():
    packed = PackedConv2d(_conv(2, 2))
    with torch.no_grad():
        for size in range(8, 8 + packing.SHAPES + 3):
            packed(torch.randn(1, 2, size, size))
    assert len(packed._packed) == packing.SHAPES


def test_activations_are_fused_only_where_the_modules_run_in_order():
    class Custom(nn.Module):  # registered conv then act, but forward does not chain them
        def __init__(self) -> None:
            super().__init__()
            self.conv = _conv(2, 2)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x) + self.conv(x)

    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1),
                        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    seq[1].running_mean.uniform_(-1, 1)
    seq[1].running_var.uniform_(0.5, 2)
    net = nn.Sequential(fuse_batchnorm(seq), Custom()).eval()
    x = torch.randn(1, 2, 12, 12)
    with torch.no_grad():
        want = net(x)
        pack_convolutions(net)
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inner = net[0]
    assert isinstance(inner[0], PackedConv2d) and inner[0].attr == "relu"
    assert isinstance(inner[2], nn.Identity)  # the ReLU now runs inside the convolution
    assert inner[3].attr == "hardtanh" and isinstance(inner[4], nn.Identity)
    assert inner[5].attr == "none"
    assert type(inner[6]) is nn.Conv2d  # reflection padding: left as it is
    custom = net[1]
    assert custom.conv.attr == "none" and isinstance(custom.act, nn.ReLU)
    pack_convolutions(net)  # packing twice changes nothing
    assert type(inner[0].conv) is nn.Conv2d


@needs_bf16_packing
@pytest.mark.parametrize("name", ["buildings", "landcover"])
def test_the_bundled_models_give_the_same_maps_packed(monkeypatch, name):
    m = load_model(name, "cpu")
    assert any(isinstance(x, PackedConv2d) and x.attr == "hardtanh"
               for x in m.segmentor.net.modules())  # the encoder's ReLU6, fused
    with rasterio.open(EXAMPLE) as ds:  # houses by the river: a boundary to refine
        raw = ds.read(window=rasterio.windows.Window(850, 300, 128, 96))
    image = torch.from_numpy(m.card.normalization.apply(raw, raw.dtype))[None]
    kw = dict(origins=[(0, 0)], precision="bfloat16", seed=2, zooms=m.card.coarse_zooms or ())
    got, n = predict_windows(m, image, **kw)
    monkeypatch.setattr(packing, "_usable", {torch.bfloat16: False})
    for memo in (x for x in m.segmentor.net.modules() if hasattr(x, "forget")):
        memo.forget()  # (the encoder's features of the image, remembered)
    want, n_plain = predict_windows(m, image, **kw)
    assert n == n_plain == 1
    assert torch.equal(got, want)


def test_a_packed_convolution_copies_and_pickles():
    packed = PackedConv2d(_conv(3, 4), nn.ReLU6())
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        want = packed(x)
        for other in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
            assert not other._packed
            assert torch.equal(other(x), want)
