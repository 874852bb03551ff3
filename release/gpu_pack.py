"""Pack a set's training arrays small enough to travel to a lent GPU machine, and unpack them.

A GPU session receives at most 64 MiB with the working tree; the training arrays of
release/prepare_data.py are many times that. ``pack`` stores each distinct image chip of
the sets once as a JPEG (``--quality``, 4:2:0) and the rest of the array files as they are
(labels, GSDs, weights, compressed), and may keep only every N-th chip of a source
(``--every massachusetts=3``; the sampling weights are rescaled so each source keeps its
share of the mix). ``unpack`` writes ordinary array files for idgbr_geo.training again.
``init`` writes a bundled model as a small card folder (float16 weights) to start from.

    .venv/bin/python release/gpu_pack.py pack buildings roads --every massachusetts=3,dubai=2
    python release/gpu_pack.py unpack .train/gpu/chips.pack.npz .train
    .venv/bin/python release/gpu_pack.py init roads --out .train/gpu/init-roads
"""

from __future__ import annotations

import argparse
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent / ".train"


def _encode(chip: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chip.transpose(1, 2, 0))).save(
        buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def _subsample(data: dict[str, np.ndarray], every: dict[str, int]) -> np.ndarray:
    """Indices of the chips kept: every ``every[source]``-th chip of a source (all of the
    others); the sampling weights are rescaled in place so each source keeps its share."""
    n = len(data["labels"])
    src = data.get("chip_source", np.full(n, ""))
    keep = np.sort(np.concatenate([np.flatnonzero(src == s)[::every.get(str(s), 1)]
                                   for s in np.unique(src)]))
    if "weight" in data:
        w = data["weight"].astype(np.float64)
        for s in np.unique(src):
            on, kept = np.flatnonzero(src == s), keep[src[keep] == s]
            w[kept] *= w[on].sum() / max(w[kept].sum(), 1e-12)
        data["weight"] = w
    return keep


def pack(names: list[str], out: Path, quality: int, every: dict[str, int],
         root: Path = ROOT) -> Path:
    """One file for several sets; a chip image that several sets share (the Dubai tiles
    label both buildings and roads) is stored once."""
    blobs: list[bytes] = []
    seen: dict[bytes, int] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        with np.load(root / f"{name}_train.npz", allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        images = data.pop("images")
        if images.dtype != np.uint8 or images.shape[1] != 3:
            raise SystemExit("only 8-bit RGB chips can be packed as JPEG")
        n = len(images)
        keep = _subsample(data, every)
        index = []
        for i in keep:
            key = images[i].tobytes()
            if key not in seen:
                seen[key] = len(blobs)
                blobs.append(_encode(images[i], quality))
            index.append(seen[key])
        for k, v in data.items():
            per_chip = v.ndim >= 1 and len(v) == n and k != "classes"
            arrays[f"{name}/{k}"] = v[keep] if per_chip else v
        arrays[f"{name}/image_index"] = np.array(index, np.int64)
        print(f"{name}: {len(keep)} of {n} chips")
    sizes = np.array([len(b) for b in blobs], np.int64)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chips.pack.npz"
    np.savez_compressed(path, jpeg=np.frombuffer(b"".join(blobs), np.uint8), jpeg_sizes=sizes,
                        jpeg_quality=np.int64(quality), sets=np.array(names), **arrays)
    print(f"{path}: {len(blobs)} distinct chips, {path.stat().st_size / 1e6:.1f} MB")
    return path


def unpack(src: Path, out: Path) -> list[Path]:
    """``out/<set>_train.npz`` for each set in the pack."""
    with np.load(src, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    blob, sizes = data["jpeg"].tobytes(), data["jpeg_sizes"]
    ends = np.cumsum(sizes)
    with ThreadPoolExecutor() as pool:
        chips = np.stack(list(pool.map(lambda se: _decode(blob[se[0]:se[1]]),
                                       zip(ends - sizes, ends, strict=True))))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in data["sets"]:
        arrays = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(f"{name}/")}
        images = chips[arrays.pop("image_index")]
        paths.append(out / f"{name}_train.npz")
        np.savez(paths[-1], images=images, **arrays)
        print(f"{paths[-1]}: {len(images)} chips")
    return paths


def init(name: str, out: Path) -> Path:
    """A model's card (a bundled name or a card path) and float16 weights in ``out``."""
    from safetensors.torch import save_file

    from idgbr_geo.registry import read_model

    _, card_path, tensors = read_model(name)
    name = card_path.stem
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
              out / f"{name}.safetensors")
    card = json.loads(card_path.read_text())
    card["weights"] = f"{name}.safetensors"
    (out / f"{name}.json").write_text(json.dumps(card, indent=1))
    print(out / f"{name}.json")
    return out / f"{name}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("sets", nargs="+")
    p.add_argument("--out", type=Path, default=ROOT / "gpu")
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--every", default="",
                   help="SOURCE=N,...: keep every N-th chip of these sources")
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("out", type=Path)
    i = sub.add_parser("init")
    i.add_argument("set")
    i.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "pack":
        every = {k: int(v) for k, v in (x.split("=") for x in args.every.split(",") if x)}
        pack(args.sets, args.out, args.quality, every)
    elif args.cmd == "unpack":
        unpack(args.src, args.out)
    else:
        init(args.set, args.out)


if __name__ == "__main__":
    main()
