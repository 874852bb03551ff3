"""Bring-your-own coarse stage: torchgeo checkpoints and TorchScript modules as segmentors."""

from __future__ import annotations

import os
import shlex

import pytest
import torch
import torch.nn.functional as F

from idgbr_geo.byo import (
    TorchSegmentor,
    load_coarse,
    load_coarse_model,
    renormalizer,
    segmentor_section,
)
from idgbr_geo.cards import ModelCard, Normalization
from idgbr_geo.errors import InputError, UserError
from idgbr_geo.interfaces import Segmentor
from idgbr_geo.registry import load_model, save_model


def make_task(**kw):
    from torchgeo.trainers import SemanticSegmentationTask

    torch.manual_seed(0)
    task = SemanticSegmentationTask(weights=None, in_channels=3, **kw)
    task.eval()
    return task


def save_ckpt(task, path):
    """The two entries of a Lightning checkpoint that a SemanticSegmentationTask needs."""
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "epoch": 3, "global_step": 120}, path)
    return path


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted ``.pt``
    could do to whoever loads it with ``weights_only=False``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def evil_checkpoint(path, marker, kind="coarse"):
    """A checkpoint that looks like a `train` one and carries the payload."""
    torch.save({"kind": kind, "arch": f"idgbr-{kind}", "config": {}, "classes": ["a", "b"],
                "hyper_parameters": {"model": "fcn", "num_classes": 2}, "state_dict": {},
                "payload": Payload(marker)}, path)
    return path


def reference(task, x, multiple=32):
    """Softmax of the task's logits on the reflect-padded input, cropped back."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="reflect")
    with torch.no_grad():
        return torch.softmax(task(xp), 1)[..., :h, :w]


@pytest.mark.parametrize("kw", [dict(model="fcn", num_filters=8, num_classes=3),
                                dict(model="unet", backbone="resnet18", num_classes=2)])
@pytest.mark.slow
def test_torchgeo_checkpoint_roundtrip(tmp_path, kw):
    task = make_task(**kw)
    seg = load_coarse_model(save_ckpt(task, tmp_path / "m.ckpt"), "cpu")
    assert isinstance(seg, Segmentor) and seg.num_classes == kw["num_classes"]
    x = torch.randn(2, 3, 40, 72)  # not a multiple of 32: padded and cropped back
    p = seg.predict(x)
    assert p.shape == (2, kw["num_classes"], 40, 72)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 40, 72))
    torch.testing.assert_close(p, reference(task, x), atol=1e-5, rtol=1e-5)


def test_binary_task_gives_two_class_probabilities(tmp_path):
    task = make_task(model="fcn", num_filters=4, task="binary", num_classes=1, loss="bce")
    seg = load_coarse_model(save_ckpt(task, tmp_path / "b.ckpt"))
    x = torch.randn(1, 3, 32, 32)
    p = seg.predict(x)
    with torch.no_grad():
        fg = torch.sigmoid(task(x))[:, 0]
    assert seg.num_classes == 2
    torch.testing.assert_close(p[:, 1], fg)
    torch.testing.assert_close(p[:, 0], 1 - fg)


def test_torchscript_module(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 5, 1)).eval()
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    seg = load_coarse_model(path, "cpu", pad_multiple=1, trust_torchscript=True)
    assert seg.num_classes == 5 and seg.bands == 4  # bands read from the first convolution
    x = torch.randn(2, 4, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(seg.predict(x), torch.softmax(net(x), 1))
    stage = load_coarse(path, "cpu", trust_torchscript=True)
    assert stage.kind == "torchscript" and stage.card is None


def test_torchscript_runs_code_so_it_needs_trust(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Conv2d(3, 2, 1)).save(str(path))
    for load in (load_coarse, load_coarse_model):
        with pytest.raises(InputError, match="runs code stored in the file.*trust_torchscript"):
            load(path, "cpu")


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.ckpt"])
def test_a_crafted_pickle_is_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "MARKER"
    evil = evil_checkpoint(tmp_path / name, marker)
    torch.load(evil, weights_only=False)  # the payload is live: unsafe loading runs it ...
    assert marker.exists()
    marker.unlink()
    loaders = [load_coarse] + ([load_coarse_model, segmentor_section]
                               if name.endswith(".ckpt") else [])
    for load in loaders:  # ... ours refuse the file with one line, without running it
        with pytest.raises(UserError, match="could run code") as err:
            load(evil)
        assert "posix.system" in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists()


def test_renormalisation_between_card_and_model():
    card = Normalization(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.1])
    model = Normalization(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    conv = renormalizer(card, model)
    raw01 = torch.rand(1, 3, 4, 4)
    card_input = (raw01 - torch.tensor(card.mean)[:, None, None]) / torch.tensor(card.std)[
        :, None, None]
    torch.testing.assert_close(conv(card_input), raw01)
    assert renormalizer(card, card) is None
    # the wrapper applies it before the network
    ident = torch.nn.Conv2d(3, 3, 1, bias=False)
    ident.weight.data = torch.eye(3)[:, :, None, None] * 10
    seg = TorchSegmentor(ident, torch.device("cpu"), input_transform=conv, pad_multiple=1)
    torch.testing.assert_close(seg.predict(card_input), torch.softmax(10 * raw01, 1))


def test_embedded_torchgeo_segmentor_in_a_model_card(tmp_path):
    task = make_task(model="fcn", num_filters=4, num_classes=2)
    ckpt = save_ckpt(task, tmp_path / "m.ckpt")
    section, state = segmentor_section(ckpt)
    card = ModelCard(name="byo", classes=["background", "building"], segmentor=section)
    save_model(card, {f"segmentor.{k}": v for k, v in state.items()}, tmp_path / "model")
    model = load_model(tmp_path / "model" / "byo.json", "cpu")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.segmentor.predict(x), reference(task, x))
    stage = load_coarse(tmp_path / "model" / "byo.json", "cpu")
    assert stage.kind == "idgbr" and stage.card.name == "byo"


def test_bad_coarse_models(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_coarse_model(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_coarse_model(junk)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(InputError, match="not a Lightning checkpoint"):
        load_coarse_model(plain)
    task = make_task(model="fcn", num_filters=4, num_classes=2)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    ckpt["hyper_parameters"]["num_classes"] = 5  # does not match the weights
    torch.save(ckpt, tmp_path / "wrong.ckpt")
    with pytest.raises(InputError, match="cannot rebuild"):
        load_coarse_model(tmp_path / "wrong.ckpt")
    ckpt["hyper_parameters"].update(task="multilabel", num_labels=2)
    torch.save(ckpt, tmp_path / "ml.ckpt")
    with pytest.raises(InputError, match="multilabel"):
        load_coarse_model(tmp_path / "ml.ckpt")
    pt = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, pt)  # a state dict, neither TorchScript nor a checkpoint
    with pytest.raises(InputError, match="neither TorchScript"):
        load_coarse(pt)
    script = tmp_path / "bad.pt"
    torch.jit.script(torch.nn.Conv2d(3, 2, 1)).save(str(script))
    with pytest.raises(InputError, match="does not run on a 5-band image"):
        load_coarse_model(script, bands=5, trust_torchscript=True)
