"""Random degradations of ground truth into plausible coarse maps."""

from __future__ import annotations

import torch

from idgbr_geo.degrade import blobs, degrade, gaussian_blur, jitter, morph


def _labels(b: int = 4, size: int = 96) -> torch.Tensor:
    lab = torch.zeros(b, size, size, dtype=torch.uint8)
    lab[:, 20:60, 30:70] = 1
    lab[:, 70:80, 10:90] = 2
    return lab


def _onehot(lab: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(lab.long(), k).permute(0, 3, 1, 2).float()


def test_degrade_gives_probabilities_close_but_not_equal_to_truth():
    lab = _labels()
    p = degrade(lab, 3, generator=torch.Generator().manual_seed(1))
    assert p.shape == (4, 3, 96, 96)
    assert torch.allclose(p.sum(1), torch.ones(4, 96, 96), atol=1e-4)
    agree = (p.argmax(1) == lab.long()).float().mean()
    assert 0.6 < agree < 0.999


def test_degrade_is_deterministic_for_a_generator_and_varies_across_seeds():
    lab = _labels()
    a = degrade(lab, 3, generator=torch.Generator().manual_seed(5))
    b = degrade(lab, 3, generator=torch.Generator().manual_seed(5))
    c = degrade(lab, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_p_onehot_sets_the_share_of_class_raster_like_maps():
    lab = _labels(8)

    def hard(p: torch.Tensor) -> torch.Tensor:  # per sample: every pixel one-hot
        return ((p == 0) | (p == 1)).flatten(1).all(1)

    assert hard(degrade(lab, 3, generator=torch.Generator().manual_seed(2), p_onehot=1.0)).all()
    assert not hard(degrade(lab, 3, generator=torch.Generator().manual_seed(2),
                            p_onehot=0.0)).any()


def test_ignored_pixels_do_not_become_a_class_of_their_own():
    lab = _labels(2)
    lab[:, :, :20] = 255
    p = degrade(lab, 3, generator=torch.Generator().manual_seed(0))
    assert p.shape[1] == 3 and torch.isfinite(p).all()


def test_morphology_grows_and_shrinks_a_class():
    oh = _onehot(_labels(1), 3)
    area = oh[:, 1].sum()
    assert morph(oh, 1, 2, dilate=True)[:, 1].sum() > area
    assert morph(oh, 1, 2, dilate=False)[:, 1].sum() < area
    assert torch.equal(morph(oh, 1, 0, dilate=True), oh)


def test_jitter_moves_boundaries_only_with_amplitude():
    oh = _onehot(_labels(1), 3)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(jitter(oh, 0.0, 16, gen), oh, atol=1e-5)
    moved = jitter(oh, 4.0, 16, torch.Generator().manual_seed(0))
    changed = (moved.argmax(1) != oh.argmax(1)).float().mean()
    assert 0 < changed < 0.2


def test_blobs_cover_about_the_requested_fraction_and_blur_keeps_mass():
    oh = _onehot(torch.zeros(2, 128, 128, dtype=torch.uint8), 2)
    out = blobs(oh, 0.1, 32, torch.Generator().manual_seed(2))
    changed = (out != oh).any(1).float().mean(dim=(1, 2))
    assert ((changed == 0) | ((changed > 0.05) & (changed < 0.15))).all()
    x = torch.rand(1, 2, 40, 40)
    assert abs(float(gaussian_blur(x, 2.0).mean() - x.mean())) < 0.02
