"""release/research/weight_soup.py: averaging a run's coarse weights with a model's, and
the coarse-only card it writes for release/validate.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

RELEASE = Path(__file__).resolve().parent.parent / "release"
if str(RELEASE) not in sys.path:
    sys.path.append(str(RELEASE))

from research.weight_soup import calibrate, coarse_card, soup, update_bn  # noqa: E402

from idgbr_geo.cards import ModelCard  # noqa: E402
from idgbr_geo.checkpoints import export_model  # noqa: E402
from idgbr_geo.registry import load_model  # noqa: E402
from idgbr_geo.training import train_coarse  # noqa: E402

TINY = {"widths": [4, 8, 8, 8]}


def test_soup_interpolates_the_weights_and_its_card_runs_coarse_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(4, 3, 64, 64)).astype(np.uint8)
    labels = (images[:, 0] > 127).astype(np.uint8)
    npz = tmp_path / "chips.npz"
    np.savez(npz, images=images, labels=labels, classes=np.array(["bg", "fg"]),
             gsd=np.float64(0.5), source=np.array("generated"))
    kw = dict(batch_size=2, crop=32, progress=False, device="cpu", config=TINY)
    start = train_coarse(npz, tmp_path / "start", iterations=2, **kw)
    card = ModelCard(name="tiny", classes=["bg", "fg"], gsd=0.5, gsd_choices=[0.4, 0.5, 0.6],
                     gsd_without_crs=0.8, coarse_zooms=[0.8, 1.25], edge_filter=True)
    model = export_model(start, None, card, tmp_path / "model")
    a = torch.load(start, weights_only=True)["model"]
    run = train_coarse(npz, tmp_path / "run", iterations=3, lr=0.05, init_weights=a, **kw)
    b = torch.load(run, weights_only=True)["model"]

    out = soup(str(model), run, tmp_path / "soup" / "checkpoint.pt", alpha=0.25)
    mixed = torch.load(out, weights_only=True)
    assert "optimizer" not in mixed  # weights only
    floats = [k for k in b if b[k].is_floating_point()]
    moved = [k for k in floats if not torch.allclose(a[k], b[k], atol=1e-4)]
    assert moved  # the run did move away from the start
    for k in floats:  # (the model's weights are stored in float16)
        torch.testing.assert_close(mixed["model"][k], 0.25 * b[k] + 0.75 * a[k],
                                   atol=2e-3, rtol=1e-3)

    path = coarse_card(str(model), out, tmp_path / "card")
    m = load_model(path, device="cpu")
    assert m.refiner is None and m.card.sampling.steps == 0
    assert m.card.gsd_choices == [0.4, 0.5, 0.6] and m.card.gsd_without_crs == 0.8
    assert m.card.coarse_zooms == [0.8, 1.25] and m.card.edge_filter
    assert m.segmentor.predict(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_soup_refuses_another_network(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    npz = tmp_path / "chips.npz"
    np.savez(npz, images=rng.integers(0, 255, size=(2, 3, 64, 64)).astype(np.uint8),
             labels=np.zeros((2, 64, 64), np.uint8), classes=np.array(["bg", "fg"]),
             gsd=np.float64(0.5), source=np.array("generated"))
    kw = dict(batch_size=2, crop=32, progress=False, device="cpu", iterations=1)
    start = train_coarse(npz, tmp_path / "start", config=TINY, **kw)
    model = export_model(start, None, ModelCard(name="tiny", classes=["bg", "fg"]),
                         tmp_path / "model")
    other = train_coarse(npz, tmp_path / "other", config={"widths": [4, 8, 8, 16]}, **kw)
    with pytest.raises(SystemExit, match="different networks"):
        soup(str(model), other, tmp_path / "soup.pt", alpha=0.5)


def test_uniform_soup_and_norm_statistics_from_training_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, size=(4, 3, 64, 64)).astype(np.uint8)
    npz = tmp_path / "chips.npz"
    np.savez(npz, images=images, labels=(images[:, 0] > 127).astype(np.uint8),
             classes=np.array(["bg", "fg"]), gsd=np.float64(0.5), source=np.array("generated"))
    kw = dict(batch_size=2, crop=32, progress=False, device="cpu", config=TINY)
    start = train_coarse(npz, tmp_path / "start", iterations=2, **kw)
    model = export_model(start, None, ModelCard(name="tiny", classes=["bg", "fg"]),
                         tmp_path / "model")
    a = torch.load(start, weights_only=True)["model"]
    runs = [train_coarse(npz, tmp_path / f"run{i}", iterations=2 + i, lr=0.05, seed=i,
                         init_weights=a, **kw) for i in range(2)]
    b, c = (torch.load(r, weights_only=True)["model"] for r in runs)

    out = soup(str(model), runs[0], tmp_path / "soup" / "checkpoint.pt", alpha=0.9,
               also=(runs[1],))
    mixed = torch.load(out, weights_only=True)["model"]
    for k in b:
        if b[k].is_floating_point():  # the mean of three, alpha unused
            torch.testing.assert_close(mixed[k], (a[k] + b[k] + c[k]) / 3, atol=2e-3, rtol=1e-3)

    means = [k for k in mixed if k.endswith("running_mean")]
    assert means
    update_bn(out, npz, batches=3)
    fresh = torch.load(out, weights_only=True)["model"]
    for k in means:  # statistics of the soup's own activations, counted over 3 batches
        assert not torch.allclose(fresh[k], mixed[k])
        assert int(fresh[k.replace("running_mean", "num_batches_tracked")]) == 3
    for k in mixed:  # the weights themselves stay
        if "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(fresh[k], mixed[k])


def test_calibrate_matches_the_labels_foreground_share(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, size=(4, 3, 64, 64)).astype(np.uint8)
    labels = (images[:, 0] > 200).astype(np.uint8)  # ~22% foreground
    npz = tmp_path / "chips.npz"
    np.savez(npz, images=images, labels=labels, classes=np.array(["bg", "fg"]),
             gsd=np.float64(0.5), source=np.array("generated"))
    ckpt = train_coarse(npz, tmp_path / "run", iterations=2, batch_size=2, crop=32,
                        progress=False, device="cpu", config=TINY)
    before = torch.load(ckpt, weights_only=True)["model"]["head.bias"].clone()
    shift = calibrate(ckpt, npz, batches=4)
    state = torch.load(ckpt, weights_only=True)
    torch.testing.assert_close(state["model"]["head.bias"], before + torch.tensor([0.0, shift]))

    # the same crops, scored again with the shifted network
    from research.weight_soup import _network

    from idgbr_geo.cards import Normalization
    from idgbr_geo.chips import load_npz, sample_batches

    state, net, tc = _network(ckpt)
    stream = sample_batches(load_npz(npz), Normalization(**state["normalization"]), tc.crop,
                            tc.batch_size, np.random.default_rng(123), scale=tc.scale,
                            sensor=False, colour=False)
    marked, share = [], []
    with torch.no_grad():
        for _ in range(4):
            img, lab, _ = next(stream)
            marked.append(net(img).argmax(1)[lab != 255].float())
            share.append(lab[lab != 255].float())
    assert abs(torch.cat(marked).mean() - torch.cat(share).mean()) < 0.01


def test_refiner_soup_is_the_mean_of_the_runs_weights(tmp_path: Path) -> None:
    from research.refiner_soup import refiner_soup

    runs = []
    for i, w in enumerate((1.0, 2.0, 6.0)):
        state = {"kind": "refiner", "iteration": 300 + i,
                 "model": {"w": torch.full((2, 2), w),
                           "bn.num_batches_tracked": torch.tensor(10 * (i + 1))}}
        torch.save(state, tmp_path / f"r{i}.pt")
        runs.append(tmp_path / f"r{i}.pt")
    out = refiner_soup(tmp_path / "soup" / "checkpoint.pt", runs)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["model"]["w"], torch.full((2, 2), 3.0))
    assert int(got["model"]["bn.num_batches_tracked"]) == 10  # the first run's counter
    assert got["iteration"] == 300
    torch.save({"kind": "coarse", "model": {"w": torch.zeros(2, 2)}}, tmp_path / "c.pt")
    with pytest.raises(SystemExit, match="refiner run"):
        refiner_soup(tmp_path / "x.pt", [runs[0], tmp_path / "c.pt"])


def test_refiner_soup_refuses_runs_of_other_shapes(tmp_path: Path) -> None:
    from research.refiner_soup import refiner_soup

    for name, shape in (("a", (2, 2)), ("b", (3, 2))):
        torch.save({"kind": "refiner", "model": {"w": torch.zeros(shape)}}, tmp_path / f"{name}.pt")
    with pytest.raises(SystemExit, match="different networks"):
        refiner_soup(tmp_path / "x.pt", [tmp_path / "a.pt", tmp_path / "b.pt"])
