"""The lite-idgbr refiner: trained on a lite-fpn coarse model's frozen encoder, exported
without a second copy of it, and run with one encoder pass per window for both stages; or
with the encoder fine-tuned, as its own copy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from idgbr_geo.cards import ModelCard
from idgbr_geo.checkpoints import (
    export_model,
    refiner_from_checkpoint,
    segmentor_from_checkpoint,
)
from idgbr_geo.encoders import MEMO_THREADS, FeatureMemo
from idgbr_geo.errors import UserError
from idgbr_geo.predict import predict_windows
from idgbr_geo.registry import load_model
from idgbr_geo.training import train_coarse, train_refiner

LITE = {"arch": "lite-fpn", "channels": 8}
REF = {"arch": "lite-idgbr", "c1": 4, "c2": 4, "c4": 8, "ch": 8}
KW = dict(batch_size=2, crop=32, progress=False, device="cpu")


@pytest.fixture
def trained(square_chips, tmp_path, imagenet):
    coarse = train_coarse(square_chips, tmp_path / "coarse", iterations=2, config=LITE, **KW)
    seg = segmentor_from_checkpoint(coarse, "cpu")
    ref = train_refiner(square_chips, tmp_path / "ref", coarse=seg, iterations=2, config=REF, **KW)
    return coarse, ref


def _windows() -> torch.Tensor:
    x = torch.zeros(3, 3, 64, 64)
    x[:, :, 16:40, 20:48] = 2.0  # a square: the coarse map may hold a boundary
    x[1] += 0.5
    x[2] = torch.randn(3, 64, 64)
    return x


def test_refiner_reads_the_coarse_models_frozen_encoder(trained):
    coarse, ref = trained
    c, r = (torch.load(p, weights_only=True) for p in (coarse, ref))
    assert r["arch"] == "lite-idgbr"
    enc = {k[len("encoder."):]: v for k, v in r["model"].items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, c["model"]["encoder." + k]) for k, v in enc.items())
    # the normalisation is the lite-fpn model's (ImageNet statistics), not refitted
    assert r["normalization"] == c["normalization"]


def test_export_stores_the_encoder_once_and_loading_shares_it(trained, tmp_path,
                                                              monkeypatch):
    coarse, ref = trained
    path = export_model(coarse, ref, ModelCard(name="m", classes=["bg", "sq"],
                                               stride_multiple=32), tmp_path / "models")
    card = json.loads(path.read_text())
    assert card["refiner"]["arch"] == "lite-idgbr"
    assert card["refiner"]["config"]["encoder"] == "segmentor"
    tensors = load_file(str(path.with_suffix(".safetensors")))
    assert not any(k.startswith("refiner.encoder.") for k in tensors)
    assert any(k.startswith("segmentor.encoder.") for k in tensors)
    model = load_model(path, "cpu")
    assert model.refiner.net.encoder is model.segmentor.net.encoder

    calls = []
    memo = model.segmentor.net.encoder
    inner = memo.encoder.forward
    memo.encoder.forward = lambda x: calls.append(len(x)) or inner(x)
    x = _windows()
    # (a two-iteration coarse model maps one class: refine windows 0 and 2 regardless)
    monkeypatch.setattr("idgbr_geo.predict.has_boundary",
                        lambda probs, valid: torch.tensor([True, False, True]))
    probs, refined = predict_windows(model, x, origins=[(0, 0), (0, 64), (64, 0)], steps=1)
    assert refined == 2 and calls == [3]  # one encoder pass for both stages

    # the same numbers as a refiner with its own, unshared copy of the encoder
    own = refiner_from_checkpoint(ref, "cpu")
    coarse_probs = model.segmentor.predict(x)
    want = own.refine(x, coarse_probs, steps=1, seed=0, origins=[(0, 0), (0, 64), (64, 0)])
    got = model.refiner.refine(x, coarse_probs, steps=1, seed=0,
                               origins=[(0, 0), (0, 64), (64, 0)])
    assert torch.allclose(got, want, atol=1e-5)


def test_a_refiner_trained_on_another_coarse_model_is_not_exported(trained, square_chips, tmp_path):
    _, ref = trained
    other = train_coarse(square_chips, tmp_path / "other", iterations=1, config=LITE, seed=3,
                         lr=0.5, **KW)
    with pytest.raises(UserError, match="not the coarse model's"):
        export_model(other, ref, ModelCard(name="m", classes=["bg", "sq"]), tmp_path / "x")


def test_resuming_keeps_the_encoder(trained, square_chips, tmp_path):
    coarse, ref = trained
    before = torch.load(ref, weights_only=True)["model"]
    train_refiner(square_chips, tmp_path / "ref", iterations=4, resume=True, **KW)
    after = torch.load(ref, weights_only=True)
    assert after["iteration"] == 4
    enc = [k for k in before if k.startswith("encoder.") and before[k].is_floating_point()]
    assert all(torch.equal(before[k], after["model"][k]) for k in enc)


def test_a_fine_tuned_encoder_is_the_refiners_own(trained, square_chips, tmp_path):
    """``encoder_lr`` > 0 trains the encoder too (at its own rate; its norms' statistics
    stay), stored and loaded as the refiner's own copy; 0 leaves it as the coarse model's."""
    coarse, _ = trained
    seg = segmentor_from_checkpoint(coarse, "cpu")
    c = torch.load(coarse, weights_only=True)["model"]
    with pytest.raises(UserError, match='set encoder to "own"'):
        train_refiner(square_chips, tmp_path / "x", coarse=seg, iterations=1,
                      config={**REF, "encoder_lr": 1e-3}, **KW)
    enc = {}
    # (the guidance enters the denoiser through zero-initialised convolutions: the
    # encoder's gradients are ~0 for the first steps, hence six)
    for lr in (0.0, 1e-2):
        ref = train_refiner(square_chips, tmp_path / f"own{lr}", coarse=seg, iterations=6,
                            config={**REF, "encoder": "own", "encoder_lr": lr}, **KW)
        model = torch.load(ref, weights_only=True)["model"]
        enc[lr] = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
        weights = [k for k in enc[lr] if k.endswith("weight")]
        stats = [k for k in enc[lr] if k.endswith(("running_mean", "running_var"))]
        assert weights and stats
        changed = [k for k in weights if not torch.equal(enc[lr][k], c["encoder." + k])]
        assert bool(changed) == (lr > 0)
        assert all(torch.equal(enc[lr][k], c["encoder." + k]) for k in stats)
    path = export_model(coarse, ref, ModelCard(name="m", classes=["bg", "sq"],
                                               stride_multiple=32), tmp_path / "models")
    tensors = load_file(str(path.with_suffix(".safetensors")))
    assert any(k.startswith("refiner.encoder.") for k in tensors)
    model = load_model(path, "cpu")
    assert model.refiner.net.encoder is not model.segmentor.net.encoder
    x = _windows()
    probs, _ = predict_windows(model, x, origins=[(0, 0), (0, 64), (64, 0)], steps=1)
    assert torch.isfinite(probs).all()


def test_the_refiner_needs_a_lite_fpn_coarse_model(square_chips, tmp_path):
    with pytest.raises(UserError, match="give the coarse model"):
        train_refiner(square_chips, tmp_path / "a", iterations=1, config=REF, **KW)
    seg = segmentor_from_checkpoint(train_coarse(square_chips, tmp_path / "c", iterations=1, **KW),
                                    "cpu")
    with pytest.raises(UserError, match="reads the encoder of a lite-fpn coarse model"):
        train_refiner(square_chips, tmp_path / "b", coarse=seg, iterations=1, config=REF, **KW)


def test_feature_memo_reuses_equal_rows_and_recomputes_others():
    calls = []

    class Enc(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return [x * 2, x.mean(1, keepdim=True)]

    memo = FeatureMemo(Enc()).eval()
    x = torch.randn(4, 3, 8, 8)
    full = memo(x)
    sub = memo(x[[1, 3]].clone())  # the engine's copy of the windows it refines
    assert calls == [4]
    assert all(torch.equal(s, f[[1, 3]]) for s, f in zip(sub, full, strict=True))
    other = x[[1]].clone()
    other[0, 0, 0, 0] += 1
    assert torch.equal(memo(other)[0], other * 2) and calls == [4, 1]
    memo.train()
    memo(x)
    memo(x)
    assert calls == [4, 1, 4, 4]  # no memo while training


def test_feature_memo_keeps_the_last_few_batches():
    calls = []

    class Enc(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            return [x + 1]

    memo = FeatureMemo(Enc(), slots=3).eval()
    window, finer, coarser, other = (torch.randn(1, 3, s, s) for s in (8, 10, 6, 12))
    for x in (window, finer, coarser):  # a window and its two zoomed views
        memo(x)
    assert torch.equal(memo(window.clone())[0], window + 1)  # the refiner's call: remembered
    assert calls == [(8, 8), (10, 10), (6, 6)]
    memo(other)  # a fourth batch pushes out the oldest one (the finer view)
    memo(finer)
    assert calls[-2:] == [(12, 12), (10, 10)]
    memo.forget()
    memo(window)
    assert calls[-1] == (8, 8)
    with pytest.raises(ValueError, match="slots"):
        FeatureMemo(Enc(), slots=0)


def test_feature_memo_keeps_each_threads_batches_apart():
    import threading

    calls = []

    class Enc(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return [x * 3]

    memo = FeatureMemo(Enc(), slots=1).eval()
    mine, theirs = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 8, 8)
    memo(mine)
    worker = threading.Thread(target=memo, args=(theirs,))  # another model worker's window
    worker.start()
    worker.join()
    assert torch.equal(memo(mine.clone())[0], mine * 3)  # not pushed out by the other thread
    assert calls == [1, 2]
    n = MEMO_THREADS + 4  # more threads at once than the memo keeps: a bounded memory
    together = threading.Barrier(n)

    def call() -> None:
        memo(theirs)
        together.wait()  # all alive at once: each thread has its own identity

    workers = [threading.Thread(target=call) for _ in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(memo._memory) == MEMO_THREADS


def test_train_refiner_cli_on_a_lite_fpn_card(square_chips, tmp_path, imagenet):
    from click.testing import CliRunner

    from idgbr_geo.cli import main

    common = ["--data", str(square_chips), "--iterations", "2", "--batch-size", "2", "--crop", "32",
              "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(main, ["train", "coarse", *common, "--out", str(tmp_path / "c"),
                                  "--name", "c", "--config", json.dumps(LITE)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train", "refiner", *common, "--out", str(tmp_path / "r"),
                                  "--name", "r", "--config", json.dumps(REF),
                                  "--coarse-model", str(tmp_path / "c" / "c.json")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    tensors = load_file(str(tmp_path / "r" / "r.safetensors"))
    assert not any(k.startswith("refiner.encoder.") for k in tensors)
    model = load_model(tmp_path / "r" / "r.json", "cpu")
    assert model.refiner.net.encoder is model.segmentor.net.encoder
    probs, _ = predict_windows(model, _windows(), origins=[(0, 0), (0, 64), (64, 0)])
    assert probs.shape == (3, 2, 64, 64)


def test_folding_the_norms_for_inference_changes_no_result_and_keeps_the_trained_weights():
    """The segmentor folds every norm, the timm encoder's included, into the convolution
    before it; the maps stay the same and the weights as trained stay available (a refiner
    trained on this model's encoder starts from them)."""
    from idgbr_geo.config import LiteFpnConfig
    from idgbr_geo.lite_fpn import build_lite_fpn
    from idgbr_geo.lite_refiner import encoder_state
    from idgbr_geo.networks import CoarseSegmentor

    torch.manual_seed(0)
    net = build_lite_fpn(LiteFpnConfig(channels=8)).eval()
    for m in net.modules():  # norms that do something (a fresh one is the identity)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    x = _windows()[:2]
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)
    seg = CoarseSegmentor(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in seg.net.modules())
    torch.testing.assert_close(seg.predict(x), expected, atol=1e-5, rtol=1e-4)
    enc = encoder_state(seg, LiteFpnConfig().variant)
    assert enc and all(torch.equal(v, trained["encoder." + k]) for k, v in enc.items())
