"""Training loops on tiny generated arrays: logs, checkpoints, resume, export, errors."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from idgbr_geo.cards import ModelCard
from idgbr_geo.checkpoints import export_model, refiner_from_checkpoint, segmentor_from_checkpoint
from idgbr_geo.chips import ChipSampler, fit_normalization, load_npz
from idgbr_geo.config import RefinerConfig, RefinerTrainingConfig, SamplingConfig
from idgbr_geo.errors import UserError
from idgbr_geo.registry import load_model
from idgbr_geo.training import _coarse_maps, train_coarse, train_refiner

TINY = {"widths": [4, 8, 8, 8]}
TINY_REF = {"c1": 4, "c2": 4, "c4": 8, "c8": 8, "ch": 8, "blocks": 1}


@pytest.fixture
def npz(tmp_path):
    """Six 64 px chips: bright squares are class 1, a stripe class 2, a corner ignored."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, size=(6, 3, 64, 64)).astype(np.uint8)
    labels = np.zeros((6, 64, 64), np.uint8)
    for i in range(6):
        r, c = rng.integers(4, 36, size=2)
        labels[i, r:r + 20, c:c + 20] = 1
        labels[i, 50:56] = 2
        labels[i, :4, :4] = 255
    images[:, :, labels[0] == 1] += 150
    path = tmp_path / "chips.npz"
    np.savez(path, images=images, labels=labels, classes=np.array(["bg", "sq", "st"]),
             gsd=np.float64(0.5), source=np.array("generated"))
    return path


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_coarse_logs_checkpoints_and_resumes(npz, tmp_path):
    out = tmp_path / "coarse"
    kw = dict(batch_size=2, crop=32, config=TINY, progress=False, checkpoint_every=3,
              device="cpu")
    ckpt = train_coarse(npz, out, val_npz=npz, iterations=6, **kw)
    assert ckpt == out / "checkpoint.pt" and ckpt.is_file()
    rows = _rows(out / "log.csv")
    assert [r["iteration"] for r in rows] == ["3", "6"]
    assert {"loss", "lr", "val_loss", "val_miou"} <= set(rows[0])
    train_coarse(npz, out, iterations=9, resume=True, **kw)
    assert [r["iteration"] for r in _rows(out / "log.csv")] == ["3", "6", "9"]
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 9 and state["classes"] == ["bg", "sq", "st"]
    seg = segmentor_from_checkpoint(ckpt, "cpu")
    assert seg.predict(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_same_seed_same_weights(npz, tmp_path):
    kw = dict(iterations=3, batch_size=2, crop=32, config=TINY, progress=False, device="cpu")
    a = torch.load(train_coarse(npz, tmp_path / "a", **kw), weights_only=True)["model"]
    b = torch.load(train_coarse(npz, tmp_path / "b", **kw), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_workers_make_the_batches_and_the_run_resumes(npz, tmp_path):
    kw = dict(batch_size=2, crop=32, config=TINY, progress=False, device="cpu", workers=2,
              checkpoint_every=2)
    a = torch.load(train_coarse(npz, tmp_path / "a", iterations=4, **kw), weights_only=True)
    b = torch.load(train_coarse(npz, tmp_path / "b", iterations=4, **kw), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    c = torch.load(train_coarse(npz, tmp_path / "b", iterations=6, resume=True, **kw),
                   weights_only=True)
    assert c["iteration"] == 6
    with pytest.raises(UserError, match="workers must be >= 0"):
        train_coarse(npz, tmp_path / "d", iterations=1, **{**kw, "workers": -1})


def test_train_refiner_and_export_a_loadable_model(npz, tmp_path):
    kw = dict(batch_size=2, crop=32, progress=False, device="cpu")
    cc = train_coarse(npz, tmp_path / "c", iterations=2, config=TINY, **kw)
    seg = segmentor_from_checkpoint(cc, "cpu")
    rc = train_refiner(npz, tmp_path / "r", coarse=seg, val_npz=npz, iterations=4,
                       checkpoint_every=2, config=TINY_REF, **kw)
    rows = _rows(tmp_path / "r" / "log.csv")
    assert len(rows) == 2 and {"loss4", "loss1", "val_miou_refined"} <= set(rows[0])
    ref = refiner_from_checkpoint(rc, "cpu")
    assert ref.refine(torch.zeros(1, 3, 32, 32), torch.full((1, 3, 32, 32), 1 / 3), steps=2,
                      seed=0, origins=[(0, 0)]).shape == (1, 3, 32, 32)
    card = ModelCard(name="tiny", classes=["bg", "sq", "st"], sampling=SamplingConfig(steps=2))
    path = export_model(cc, rc, card, tmp_path / "models")
    model = load_model(path, "cpu")
    norm = fit_normalization(load_npz(npz)["images"])
    assert model.card.normalization.mean == pytest.approx(norm.mean)
    assert model.card.refiner["arch"] == "idgbr-refiner"
    # architecture, sampling and training settings each in their own place
    assert model.card.refiner["config"] == RefinerConfig(**TINY_REF).to_dict()
    assert model.card.sampling.steps == 2
    assert model.card.training.refiner == RefinerTrainingConfig(
        iterations=4, batch_size=2, crop=32, checkpoint_every=2).to_dict()
    assert model.card.training.segmentor["iterations"] == 2
    img = torch.randn(1, 3, 32, 32)
    probs = model.segmentor.predict(img)
    out = model.refiner.refine(img, probs, steps=2, seed=0, origins=[(0, 0)])
    assert out.shape == (1, 3, 32, 32)


def test_degradation_only_refiner_and_ablation_modes(npz, tmp_path):
    kw = dict(iterations=2, batch_size=2, crop=32, progress=False, device="cpu")
    for name, cfg in (("plain", {}), ("norough", {"use_coarse": False}),
                      ("oneshot", {"mode": "oneshot"})):
        ckpt = train_refiner(npz, tmp_path / name, coarse=None, config={**TINY_REF, **cfg}, **kw)
        assert torch.load(ckpt, weights_only=True)["config"]["num_classes"] == 3


def test_user_errors(npz, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(UserError, match="not a training array"):
        train_coarse(bad, tmp_path / "x", iterations=1, progress=False)
    with pytest.raises(UserError, match="cannot read"):
        load_npz(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="needs coarse maps"):
        train_refiner(npz, tmp_path / "y", coarse=None, degradation=False, progress=False)
    cc = train_coarse(npz, tmp_path / "c", iterations=1, batch_size=2, crop=32, config=TINY,
                      progress=False, device="cpu")
    with pytest.raises(UserError, match="trained for classes"):
        export_model(cc, None, ModelCard(name="t", classes=["a", "b"]), tmp_path / "m")
    with pytest.raises(UserError, match="not a refiner"):
        refiner_from_checkpoint(cc, "cpu")


def test_weight_averaging_exports_the_average_and_resumes_exactly(npz, tmp_path):
    kw = dict(batch_size=2, crop=32, progress=False, device="cpu", checkpoint_every=2,
              config={**TINY, "ema": 0.5})
    whole = torch.load(train_coarse(npz, tmp_path / "whole", iterations=4, **kw),
                       weights_only=True)
    # the exported weights are the running average, not the last optimiser step ...
    avg, own = whole["model"], whole["trained_model"]
    assert any(not torch.equal(avg[k], own[k]) for k in avg if avg[k].is_floating_point())
    # ... which is what the averaging rule gives from the previous checkpoint
    half = torch.load(train_coarse(npz, tmp_path / "half", iterations=2, **kw),
                      weights_only=True)
    name = next(k for k in avg if k.endswith("weight") and avg[k].dim() == 4)
    assert not torch.equal(avg[name], half["model"][name])
    # stopping at 2 and resuming to 4 gives the same average as an uninterrupted run
    resumed = torch.load(train_coarse(npz, tmp_path / "half", iterations=4, resume=True, **kw),
                         weights_only=True)
    assert all(torch.equal(avg[k], resumed["model"][k]) for k in avg)
    assert all(torch.equal(own[k], resumed["trained_model"][k]) for k in own)


def _with_stored_maps(npz, tmp_path, k=3):
    """The chips of ``npz`` plus stored coarse maps: the labels one-hot (x 255)."""
    data = dict(np.load(npz))
    lab = data["labels"]
    onehot = np.stack([(lab == c) for c in range(k)], axis=1).astype(np.uint8) * 255
    path = tmp_path / f"stored{k}.npz"
    np.savez(path, **data, coarse=onehot)
    return path


def test_stored_coarse_maps_are_cropped_and_augmented_with_the_image(npz, tmp_path):
    data = load_npz(_with_stored_maps(npz, tmp_path))
    norm = fit_normalization(data["images"])
    exact = ChipSampler(data, norm, 32, np.random.default_rng(0), scale=(1.0, 1.0))
    img, lab, pre = exact.sample(16)
    assert pre.shape == (16, 3, 32, 32) and pre.min() >= 0 and pre.max() <= 1
    known = lab != 255
    assert torch.equal(pre.max(1).indices[known], lab[known])  # same crop, rotation, flip
    scaled = ChipSampler(data, norm, 32, np.random.default_rng(1))  # resized as well
    _, slab, spre = scaled.sample(16)
    known = slab != 255
    assert (spre.max(1).indices[known] == slab[known]).float().mean() > 0.95
    plain = ChipSampler(load_npz(npz), norm, 32, np.random.default_rng(0), scale=(1.0, 1.0))
    img2, lab2, none = plain.sample(16)
    assert none is None  # and the random crops are the same as with stored maps
    assert torch.equal(img, img2) and torch.equal(lab, lab2)


def test_refiner_learns_from_stored_coarse_maps(npz, tmp_path):
    stored = _with_stored_maps(npz, tmp_path)
    lab = torch.from_numpy(np.load(stored)["labels"][:2].astype(np.int64))
    pre = torch.rand(2, 3, 64, 64)
    got = _coarse_maps(torch.zeros(2, 3, 64, 64), lab, 3, None, 1.0, torch.Generator(),
                       np.random.default_rng(0), stored=pre)
    assert torch.equal(got, pre)  # used as they are, no model and no degradation
    ckpt = train_refiner(stored, tmp_path / "r", coarse=None, degradation=False, iterations=2,
                         batch_size=2, crop=32, config=TINY_REF, progress=False, device="cpu")
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2
    wrong = _with_stored_maps(npz, tmp_path, k=2)
    with pytest.raises(UserError, match="coarse maps have 2 classes"):
        train_refiner(wrong, tmp_path / "w", iterations=1, progress=False, device="cpu")


def test_crafted_checkpoints_are_refused_and_never_run(npz, tmp_path):
    """A pickle payload in a checkpoint (given, or planted for --resume) never runs."""
    from test_byo import evil_checkpoint

    marker = tmp_path / "MARKER"
    kw = dict(iterations=2, batch_size=2, crop=32, progress=False, device="cpu")
    calls = [
        lambda p: segmentor_from_checkpoint(p, "cpu"),
        lambda p: refiner_from_checkpoint(p, "cpu"),
        lambda p: export_model(p, None, ModelCard(name="t", classes=["a", "b"]), tmp_path / "m"),
        lambda p: train_coarse(npz, p.parent, resume=True, config=TINY, **kw),
        lambda p: train_refiner(npz, p.parent, resume=True, config=TINY_REF, **kw),
    ]
    for i, call in enumerate(calls):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        kind = "refiner" if i in (1, 4) else "coarse"
        evil = evil_checkpoint(folder / "checkpoint.pt", marker, kind=kind)
        with pytest.raises(UserError, match="could run code") as err:
            call(evil)
        assert "\n" not in str(err.value)
        assert not marker.exists()


def test_a_checkpoint_that_loads_but_is_not_ours_is_one_error(npz, tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    torch.save({"kind": "coarse", "config": "x"}, folder / "checkpoint.pt")
    with pytest.raises(UserError, match="cannot be resumed"):
        train_coarse(npz, folder, iterations=2, resume=True, progress=False, device="cpu")
    with pytest.raises(UserError, match="bad coarse-model checkpoint"):
        segmentor_from_checkpoint(folder / "checkpoint.pt", "cpu")
    (folder / "checkpoint.pt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        train_coarse(npz, folder, iterations=2, resume=True, progress=False, device="cpu")


@pytest.mark.parametrize(("train", "config", "message"), [
    ("coarse", {"widht": [4, 8, 8, 8]}, "config: unknown coarse setting 'widht'"),
    ("coarse", {"p_coarse_x0": 0.5}, "unknown coarse setting 'p_coarse_x0'"),
    ("refiner", {"steps": 2}, "unknown refiner setting 'steps'"),
    ("refiner", {"start": "coarse"}, "unknown refiner setting 'start'"),
    ("refiner", {"iterations": 5}, "'iterations' has its own option"),
    ("refiner", {"p_model": 2.0}, "'p_model' must be a number in 0.0..1.0"),
    ("refiner", {"mode": "oneshoot"}, "'mode' must be one of diffusion, oneshot"),
])
def test_unknown_or_bad_config_keys_are_refused(npz, tmp_path, train, config, message):
    fn = train_coarse if train == "coarse" else train_refiner
    with pytest.raises(UserError, match=message):
        fn(npz, tmp_path / "run", iterations=1, config=config, progress=False, device="cpu")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_checkpoint_of_the_flat_config_format_still_loads(npz, tmp_path):
    """Checkpoints written before the typed configs kept architecture, training and sampler
    options in one flat ``config``: they load into the same networks."""
    kw = dict(iterations=1, batch_size=2, crop=32, progress=False, device="cpu")
    rc = train_refiner(npz, tmp_path / "r", coarse=None, config=TINY_REF, **kw)
    state = torch.load(rc, weights_only=True)
    old = dict(state)
    old["config"] = {**state["config"], **state.pop("training"), "steps": 4, "start": "noise",
                     "t_start": 1.0}
    del old["training"]
    torch.save(old, tmp_path / "old.pt")
    img, coarse = torch.randn(1, 3, 32, 32), torch.full((1, 3, 32, 32), 1 / 3)
    a, b = (refiner_from_checkpoint(p, "cpu").refine(img, coarse, steps=1, seed=0,
                                                     origins=[(0, 0)])
            for p in (rc, tmp_path / "old.pt"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [[1.0], [2.0, 1.0], [0.0, 1.0], "big"])
def test_bad_scale_range_is_refused(npz, tmp_path, scale):
    with pytest.raises(UserError, match="'scale' must be"):
        train_coarse(npz, tmp_path / "c", iterations=1, config={"scale": scale},
                     batch_size=2, crop=32, progress=False, device="cpu")


def test_a_new_run_starts_from_given_weights(npz, tmp_path):
    """``init_weights`` continues a trained network in a new run (a longer run whose
    checkpoint is gone, or fine-tuning a bundled model); weights of another shape are one
    UserError, not a traceback."""
    kw = dict(batch_size=2, crop=32, progress=False, device="cpu", config=TINY)
    first = torch.load(train_coarse(npz, tmp_path / "a", iterations=3, **kw),
                       weights_only=True)["model"]
    # a vanishing learning rate keeps the start: the new run's weights are the given ones
    again = torch.load(train_coarse(npz, tmp_path / "b", iterations=1, lr=1e-12,
                                    init_weights=first, **kw), weights_only=True)["model"]
    fresh = torch.load(train_coarse(npz, tmp_path / "c", iterations=1, lr=1e-12, **kw),
                       weights_only=True)["model"]
    floats = [k for k in first if first[k].is_floating_point() and "running" not in k]
    assert all(torch.allclose(first[k], again[k], atol=1e-6) for k in floats)
    assert not all(torch.allclose(first[k], fresh[k], atol=1e-6) for k in floats)
    wrong = {k: v[..., :1] if v.ndim == 4 else v for k, v in first.items()}
    with pytest.raises(UserError, match="initial weights do not fit"):
        train_coarse(npz, tmp_path / "d", iterations=1, init_weights=wrong, **kw)
    rc = torch.load(train_refiner(npz, tmp_path / "r", iterations=2, config=TINY_REF,
                                  batch_size=2, crop=32, progress=False, device="cpu"),
                    weights_only=True)["model"]
    with pytest.raises(UserError, match="1 missing"):
        train_refiner(npz, tmp_path / "r2", iterations=1, config=TINY_REF, batch_size=2,
                      crop=32, progress=False, device="cpu",
                      init_weights={k: v for k, v in list(rc.items())[1:]})


def test_a_weights_only_checkpoint_still_loads_but_not_to_resume(npz, tmp_path):
    from idgbr_geo.checkpoints import RESUME_ONLY, weights_only

    ckpt = train_coarse(npz, tmp_path / "c", iterations=2, batch_size=2, crop=32, config=TINY,
                        progress=False, device="cpu")
    state = torch.load(ckpt, weights_only=True)
    slim = weights_only(state)
    assert not set(RESUME_ONLY) & set(slim) and "optimizer" in state
    torch.save(slim, tmp_path / "slim.pt")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(segmentor_from_checkpoint(tmp_path / "slim.pt", "cpu").predict(x),
                       segmentor_from_checkpoint(ckpt, "cpu").predict(x))


def test_refiner_can_learn_from_the_coarse_models_zoomed_views(npz, tmp_path):
    from idgbr_geo.views import multiscale_probabilities

    class Seen:
        num_classes = 3

        def __init__(self) -> None:
            self.sizes: list[tuple[int, ...]] = []

        def predict(self, x: torch.Tensor) -> torch.Tensor:
            self.sizes.append(tuple(x.shape[-2:]))
            return torch.softmax(x[:, :3] * 4, 1)

    img, lab = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.long)
    seg = Seen()
    got = _coarse_maps(img, lab, 3, seg, 1.0, torch.Generator(), np.random.default_rng(0),
                       zooms=(0.8, 1.25))
    assert seg.sizes == [(96, 96), (128, 128), (64, 64)]  # every crop gets every view
    torch.testing.assert_close(got, multiscale_probabilities(Seen(), img, (0.8, 1.25),
                                                             confident=math.inf))
    cc = train_coarse(npz, tmp_path / "c", iterations=1, batch_size=2, crop=32, config=TINY,
                      progress=False, device="cpu")
    rc = train_refiner(npz, tmp_path / "r", coarse=segmentor_from_checkpoint(cc, "cpu"),
                       iterations=1, batch_size=2, crop=32, progress=False, device="cpu",
                       config={**TINY_REF, "coarse_zooms": [0.8, 1.25]})
    assert torch.load(rc, weights_only=True)["training"]["coarse_zooms"] == [0.8, 1.25]
    for bad in ([1.0], [3], "0.8", [math.nan]):
        with pytest.raises(UserError, match="coarse_zooms"):
            train_refiner(npz, tmp_path / "x", iterations=1, progress=False, device="cpu",
                          config={**TINY_REF, "coarse_zooms": bad})


def test_colour_augmentation_reaches_the_batches_and_the_checkpoint(npz, tmp_path):
    """``colour_aug`` is a training setting: recorded in the checkpoint, and a run with
    the strong jitter learns from other batches than one with the mild (same seed)."""
    kw = dict(iterations=2, batch_size=2, crop=32, progress=False, device="cpu")
    states = {}
    for colour in ("mild", "strong"):
        path = train_coarse(npz, tmp_path / colour, config={**TINY, "colour_aug": colour}, **kw)
        states[colour] = torch.load(path, weights_only=True)
        assert states[colour]["training"]["colour_aug"] == colour
    a, b = (states[c]["model"] for c in ("mild", "strong"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("term", ["cldice", "lovasz"])
def test_loss_terms_are_coarse_training_settings(npz, tmp_path, term):
    """``cldice`` or ``lovasz`` > 0 changes what the segmentor learns (same seed and
    batches), is recorded in the checkpoint, and is refused where it means nothing
    (refiner) or < 0."""
    from idgbr_geo.losses import coarse_loss

    logits = torch.randn(2, 2, 32, 32, requires_grad=True)
    lab = torch.zeros(2, 32, 32, dtype=torch.long)
    lab[:, :, 10:14] = 1
    coarse_loss(logits, lab, 2, **{term: 0.5}).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    kw = dict(iterations=2, batch_size=2, crop=32, progress=False, device="cpu")
    states = {}
    for w in (0.0, 1.0):
        path = train_coarse(npz, tmp_path / str(w), config={**TINY, term: w}, **kw)
        states[w] = torch.load(path, weights_only=True)
        assert states[w]["training"][term] == w
    a, b = (states[w]["model"] for w in (0.0, 1.0))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=term):
        train_coarse(npz, tmp_path / "neg", config={**TINY, term: -1}, **kw)
    with pytest.raises(UserError, match=term):
        train_refiner(npz, tmp_path / "ref", config={**TINY_REF, term: 0.5}, **kw)


def test_bfloat16_training_runs_the_networks_in_bfloat16_and_keeps_float32_weights(
        npz, tmp_path, monkeypatch):
    """``precision="bfloat16"``: the convolutions run in bfloat16 (so the run differs from
    float32's with the same seed), the losses stay finite, the weights stay float32 and the
    checkpoint loads as any other; both stages; an unknown precision is a UserError."""
    import idgbr_geo.training as tr

    seen: list[torch.dtype] = []
    real = tr.coarse_loss

    def spy(logits, *a, **k):
        seen.append(logits.dtype)
        return real(logits, *a, **k)

    monkeypatch.setattr(tr, "coarse_loss", spy)
    kw = dict(iterations=3, batch_size=2, crop=32, config=TINY, progress=False, device="cpu",
              checkpoint_every=3)
    states = {p: torch.load(train_coarse(npz, tmp_path / p, precision=p, val_npz=npz, **kw),
                            weights_only=True) for p in ("float32", "bfloat16")}
    assert seen == [torch.float32] * 3 + [torch.bfloat16] * 3
    a, b = states["float32"]["model"], states["bfloat16"]["model"]
    assert all(v.dtype == a[k].dtype for k, v in b.items())
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert math.isfinite(float(_rows(tmp_path / "bfloat16" / "log.csv")[-1]["loss"]))
    ref = train_refiner(npz, tmp_path / "ref", coarse=segmentor_from_checkpoint(
        tmp_path / "bfloat16" / "checkpoint.pt", "cpu"), precision="bfloat16",
        **{**kw, "config": TINY_REF})
    assert math.isfinite(float(_rows(ref.parent / "log.csv")[-1]["loss"]))
    with pytest.raises(UserError, match="precision"):
        train_coarse(npz, tmp_path / "bad", precision="half", **kw)
