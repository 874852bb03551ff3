"""The vectorised per-pixel class maximum must be torch.max over classes, ties included."""

from __future__ import annotations

import pytest
import torch

from idgbr_geo.argmax import class_max


@pytest.mark.parametrize("k", [1, 2, 3, 6, 9])
def test_class_max_equals_torch_max_with_ties_to_the_lowest_class(k):
    g = torch.Generator().manual_seed(k)
    p = torch.softmax(torch.randn(2, k, 33, 17, generator=g), 1)
    p[:, :, :4, :4] = 1.0 / k  # every class tied
    if k > 2:
        p[0, 1:3, 5, 5] = 0.9  # a tie between two classes that is not the first one
        p[0, 0, 5, 5] = 0.1
    values, idx = class_max(p)
    ref_values, ref_idx = p.max(1, keepdim=True)
    assert idx.dtype == torch.uint8 and idx.shape == (2, 1, 33, 17)
    assert torch.equal(values, ref_values)
    assert torch.equal(idx.long(), ref_idx)
    if k > 2:
        assert idx[0, 0, 5, 5] == 1


def test_class_max_works_on_channels_last_and_integer_maps():
    p = torch.rand(1, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    assert torch.equal(class_max(p)[1].long(), p.max(1, keepdim=True).indices)
    ids = torch.randint(0, 5, (1, 3, 8, 8))
    assert torch.equal(class_max(ids)[1].long(), ids.max(1, keepdim=True).indices)
