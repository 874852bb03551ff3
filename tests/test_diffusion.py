"""Label diffusion: schedule, latent encoding, objective and the deterministic DDIM sampler."""

from __future__ import annotations

import pytest
import torch
from synth import refiner_net

from idgbr_geo.diffusion import (
    LATENT_SCALE,
    alpha_bar,
    labels_to_probs,
    near_boundary,
    sample,
    timesteps,
    to_latent,
    training_loss,
)
from idgbr_geo.networks import RefinerNet


def test_schedule_goes_from_signal_to_noise():
    ab = alpha_bar(torch.linspace(0, 1, 11))
    assert ab[0] > 0.99 and ab[-1] < 0.01
    assert (ab[1:] < ab[:-1]).all()
    assert timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_latent_is_scaled_one_hot_at_quarter_resolution():
    lab = torch.zeros(1, 8, 8, dtype=torch.uint8)
    lab[0, :4, :4] = 1
    lab[0, 4:, 4:] = 255
    p = labels_to_probs(lab, 2)
    assert torch.equal(p[0, :, 0, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(p[0, :, 7, 7], torch.tensor([0.5, 0.5]))
    z = to_latent(p)
    assert z.shape == (1, 2, 8 // LATENT_SCALE, 8 // LATENT_SCALE)
    assert torch.equal(z[0, :, 0, 0], torch.tensor([-1.0, 1.0]))
    assert torch.equal(z[0, :, 1, 1], torch.tensor([0.0, 0.0]))


def test_sampling_is_deterministic_for_a_seed():
    net = refiner_net()
    img, coarse = torch.randn(1, 3, 64, 64), torch.rand(1, 2, 64, 64)
    kw = dict(steps=3, origins=[(0, 0)])
    a = sample(net, img, coarse, seed=1, **kw)
    b = sample(net, img, coarse, seed=1, **kw)
    c = sample(net, img, coarse, seed=2, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_noise_is_keyed_by_window_origin():
    net = refiner_net()
    img, coarse = torch.randn(1, 3, 32, 32), torch.rand(1, 2, 32, 32)
    batch = sample(net, img.expand(2, -1, -1, -1), coarse.expand(2, -1, -1, -1), steps=2,
                   seed=0, origins=[(0, 0), (32, 64)])
    single = sample(net, img, coarse, steps=2, seed=0, origins=[(32, 64)])
    assert torch.allclose(batch[1:], single, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_multiclass_and_oneshot_shapes():
    net = refiner_net(5)
    img, coarse = torch.randn(2, 3, 32, 48), torch.rand(2, 5, 32, 48)
    for kw in ({}, {"oneshot": True}):
        out = sample(net, img, coarse, steps=2, seed=0, origins=[(0, 0), (0, 48)], **kw)
        assert out.shape == (2, 5, 32, 48) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        sample(net, img[..., :30], coarse[..., :30], steps=1, seed=0, origins=[(0, 0)] * 2)


def test_training_loss_learns_to_copy_a_clean_coarse_map():
    """A few steps on one fixed example lower the objective (the gradient path is live)."""
    torch.manual_seed(0)
    net = RefinerNet(num_classes=2)
    lab = torch.zeros(2, 32, 32, dtype=torch.uint8)
    lab[:, 8:24, 8:20] = 1
    lab[1, :2] = 255
    img = torch.randn(2, 3, 32, 32)
    coarse = labels_to_probs(lab, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(1)  # same t and noise each step
        loss, parts = training_loss(net, img, coarse, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(parts) == {"loss4", "loss1"}
    assert losses[-1] < 0.5 * losses[0]


def test_near_boundary_marks_pixels_within_the_radius_of_a_class_change():
    lab = torch.zeros(1, 12, 12, dtype=torch.uint8)
    lab[0, :, 6:] = 1
    lab[0, :3, :] = 255  # ignored rows make no boundary with their neighbours
    m = near_boundary(lab, 0)
    assert m[0, 5:, 5:7].eq(1).all() and m[0, 5:, :5].eq(0).all() and m[0, 5:, 7:].eq(0).all()
    assert m[0, :3].eq(0).all()  # ignored pixels are never boundary
    assert m[0, 3, 5] == 1  # next to ignored rows, a real class change still counts
    m2 = near_boundary(lab, 2)
    assert m2[0, 5:, 3:9].eq(1).all() and m2[0, 5:, :3].eq(0).all() and m2[0, 5:, 9:].eq(0).all()
    assert near_boundary(torch.ones(1, 8, 8, dtype=torch.uint8), 2).sum() == 0


def test_boundary_weight_moves_the_loss_towards_boundary_pixels():
    net = refiner_net()
    lab = torch.zeros(2, 32, 32, dtype=torch.uint8)
    lab[:, 8:24, 8:20] = 1
    img = torch.randn(2, 3, 32, 32)
    coarse = labels_to_probs(lab, 2)
    flat = torch.zeros(2, 32, 32, dtype=torch.uint8)

    def loss1(labels, **kw):
        torch.manual_seed(3)
        return training_loss(net, img, coarse, labels, **kw)[1]["loss1"]

    # no boundary anywhere: every pixel has weight 1 + w, so the weighted mean is unchanged
    assert abs(loss1(flat, boundary_weight=4.0) - loss1(flat)) < 1e-5
    plain, weighted = loss1(lab), loss1(lab, boundary_weight=4.0)
    assert abs(weighted - plain) > 1e-4  # boundary pixels' losses differ from the rest
    only_ignored = torch.full_like(lab, 255)
    torch.manual_seed(3)
    loss, _ = training_loss(net, img, coarse, only_ignored, boundary_weight=4.0)
    assert torch.isfinite(loss)


def test_noised_coarse_training_feeds_the_coarse_map_into_x_t():
    """With p_coarse_x0=1 the denoiser's input depends on the coarse map, with 0 it does not."""
    net = RefinerNet(num_classes=2)
    seen = []
    net.denoiser.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    lab = torch.zeros(1, 32, 32, dtype=torch.uint8)
    img = torch.randn(1, 3, 32, 32)
    good, bad = labels_to_probs(lab, 2), labels_to_probs(1 - lab, 2)
    for p in (0.0, 1.0):
        for coarse in (good, bad):
            torch.manual_seed(0)
            training_loss(net, img, coarse, lab, p_coarse_x0=p)
    assert torch.equal(seen[0], seen[1])
    assert not torch.allclose(seen[2], seen[3])


def test_residual_refiner_starts_as_the_identity_and_its_correction_changes_it():
    torch.manual_seed(1)
    k, n = 3, 32
    image = torch.randn(2, 3, n, n)
    coarse = torch.softmax(3 * torch.randn(2, k, n, n), 1)
    net = RefinerNet(num_classes=k, residual=True).eval()
    for steps in (1, 3):
        out = sample(net, image, coarse, steps=steps, seed=0, origins=[(0, 0), (0, 32)])
        # untrained: the correction is zero, so the refined map is the coarse map
        assert torch.equal(out.argmax(1), coarse.argmax(1))
        assert torch.allclose(torch.softmax(out, 1), coarse, atol=5e-3)
    torch.nn.init.normal_(net.denoiser.out.weight, std=1.0)
    torch.nn.init.normal_(net.decoder.out.weight, std=1.0)
    out = sample(net, image, coarse, steps=1, seed=0, origins=[(0, 0), (0, 32)])
    assert not torch.equal(out.argmax(1), coarse.argmax(1))
    loss, _ = training_loss(net.train(), image, coarse, coarse.argmax(1))
    loss.backward()
    assert net.denoiser.out.weight.grad.abs().sum() > 0
    assert not RefinerNet(num_classes=k, residual=True, use_coarse=False).residual
