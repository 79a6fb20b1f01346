"""Write a small ImageNet-layout dataset whose classes are learnable.

    python data_prep/make_toy_imagenet.py --out data/toy_imagenet [--classes 10
        --per-class 100 --val-per-class 20 --seed 0 --corrupt]

Layout: ``OUT/train/<wnid>/<wnid>_<n>.JPEG`` and ``OUT/val/<wnid>/...``, labels being the
sorted wnids, exactly like ImageNet. Each class has its own texture (stripes, checks, rings,
dots, blobs), frequency, orientation, palette and foreground shape; every image draws its
own size (96..320 px a side, aspect 0.6..1.7), jitter and noise, so a model must learn the
class statistics rather than one picture. With ``--random-palette`` every image draws its own
colours, so colour says nothing about the class (the evaluation's harder variant).

Like real ImageNet, the train split also holds odd files: CMYK JPEGs, grayscale JPEGs, one
PNG saved under a .JPEG name and EXIF-rotated JPEGs (stored pixels rotated, an Orientation
tag saying how to undo it). With ``--corrupt`` it adds one truncated JPEG, one zero-byte
file and one file of random bytes. ``OUT/toy_manifest.json`` lists every odd file.

With ``--segmentation`` it writes the toy semantic-segmentation set instead, in ADE20K's
layout (``OUT/images/{training,validation}/*.jpg``, ``OUT/annotations/.../*.png``; labels 0 =
unlabelled, 1-5 the background textures, 6-8 the shapes; random palettes; see
make_segmentation).

Deterministic: the same arguments give byte-identical files. The tree is written under
``OUT.partial`` and renamed when complete, so an interrupted run leaves no half dataset.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout (no pip install)

FORMAT = "beitfast-toy-imagenet/1"
TEXTURES = ("stripes", "checks", "rings", "dots", "blobs")
SHAPES = ("circle", "square", "triangle", "none")
EXIF_ORIENTATION = 0x0112


def wnid(c: int) -> str:
    """A WordNet-style id, the folder name ImageNet uses for a class."""
    return f"n{1440000 + 7919 * c:08d}"


def class_params(c: int, seed: int) -> dict:
    r = np.random.default_rng([seed, 7, c])
    return {
        "texture": TEXTURES[c % len(TEXTURES)],
        "shape": SHAPES[(c // len(TEXTURES) + c) % len(SHAPES)],
        "freq": float(r.uniform(3, 14)),
        "angle": float(r.uniform(0, np.pi)),
        "bg": r.uniform(0, 255, size=(2, 3)),  # two background colours the texture mixes
        "fg": r.uniform(0, 255, size=3),
    }


def render(p: dict, r: np.random.Generator, sides: tuple[int, int] = (96, 320), with_shape: bool = False):
    """One RGB uint8 image (H, W, 3) of a class with parameters `p`; with `with_shape`, also
    the boolean (H, W) map of its foreground shape (all False for shape 'none')."""
    side = r.uniform(*sides)
    ar = np.exp(r.uniform(np.log(0.6), np.log(1.7)))
    h, w = int(side / np.sqrt(ar)), int(side * np.sqrt(ar))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y /= max(h, w)
    x /= max(h, w)
    freq = p["freq"] * r.uniform(0.8, 1.25)
    ang = p["angle"] + r.normal(0, 0.15)
    u = x * np.cos(ang) + y * np.sin(ang)
    v = -x * np.sin(ang) + y * np.cos(ang)
    phase = r.uniform(0, 2 * np.pi)
    t = p["texture"]
    if t == "stripes":
        m = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
    elif t == "checks":
        m = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v))
    elif t == "rings":
        cy, cx = r.uniform(0, h / max(h, w)), r.uniform(0, w / max(h, w))
        m = 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(y - cy, x - cx) + phase)
    elif t == "dots":
        m = (np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v) > 0.5).astype(np.float32)
    else:  # blobs: smooth noise upsampled from a coarse grid
        g = r.random((int(freq) + 2, int(freq) + 2)).astype(np.float32)
        m = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
    bg0 = np.clip(p["bg"][0] + r.normal(0, 12, 3), 0, 255)
    bg1 = np.clip(p["bg"][1] + r.normal(0, 12, 3), 0, 255)
    img = bg0 * m[..., None] + bg1 * (1 - m[..., None])
    if p["shape"] != "none":
        cy, cx = r.uniform(0.3, 0.7) * h, r.uniform(0.3, 0.7) * w
        rad = r.uniform(0.15, 0.35) * min(h, w)
        yy, xx = np.mgrid[0:h, 0:w]
        if p["shape"] == "circle":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
        elif p["shape"] == "square":
            inside = (np.abs(yy - cy) < rad) & (np.abs(xx - cx) < rad)
        else:
            inside = (yy > cy - rad) & (yy < cy + rad) & (np.abs(xx - cx) < (yy - (cy - rad)) / 2)
        img[inside] = np.clip(p["fg"] + r.normal(0, 10, 3), 0, 255)
    else:
        inside = np.zeros((h, w), bool)
    img += r.normal(0, 6, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img, inside) if with_shape else img


def encode(img: np.ndarray, kind: str) -> bytes:
    """Encode `img` as the file kind: jpeg, cmyk, gray, png or exif (Orientation 6)."""
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    if kind == "jpeg":
        pil.save(buf, "JPEG", quality=90)
    elif kind == "cmyk":
        pil.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "gray":
        pil.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "png":
        pil.save(buf, "PNG")
    elif kind == "exif":
        # Orientation 6 means "rotate 90 degrees clockwise to display": store the picture
        # turned 90 degrees counter-clockwise, so that honouring the tag restores it.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        pil.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown file kind {kind!r}")
    return buf.getvalue()


def oddities(n_train: int, corrupt: bool) -> dict[int, str]:
    """Which train images (by global index) are written as which odd kind."""
    kinds = ["cmyk", "cmyk", "gray", "gray", "png", "exif", "exif"]
    if corrupt:
        kinds += ["truncated", "empty", "garbage"]
    if n_train < 3 * len(kinds):
        return {}
    step = n_train // len(kinds)
    return {i * step + step // 2: k for i, k in enumerate(kinds)}


def _existing(manifest_path: Path, fmt: str, args: dict, what: str) -> dict | None:
    """The manifest of a set already made with `args` (then nothing is written again), None
    when there is none; FileExistsError when one made with other arguments is there."""
    if not manifest_path.exists():
        return None
    old = json.loads(manifest_path.read_text())
    if old.get("args") == args and old.get("format") == fmt:
        return old
    raise FileExistsError(f"{manifest_path.parent} holds {what} made with other arguments ({old.get('args')}); "
                          f"remove it or choose another --out")


def make(out: Path | str, classes: int = 10, per_class: int = 100, val_per_class: int = 20,
         seed: int = 0, corrupt: bool = False, progress: bool = True, sides: tuple[int, int] = (96, 320),
         random_palette: bool = False) -> dict:
    """Write the dataset to `out` (atomically) and return its manifest. `sides`: the range of
    an image's geometric-mean side in pixels ((380, 480) gives ImageNet-sized images, about
    500 x 375). `random_palette`: every image draws its own colours, so only texture, frequency,
    orientation and shape carry the class (a colour-histogram classifier is at chance; the
    evaluation's harder variant)."""
    if classes < 1 or per_class < 1 or val_per_class < 0:
        raise ValueError(f"need classes >= 1, per_class >= 1, val_per_class >= 0; got {classes}, {per_class}, {val_per_class}")
    args = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class,
            "seed": seed, "corrupt": corrupt}
    if tuple(sides) != (96, 320):  # recorded only when not the default, so older datasets stay valid
        args["sides"] = list(sides)
    if random_palette:
        args["random_palette"] = True
    out = Path(out)
    old = _existing(out / "toy_manifest.json", FORMAT, args, "a toy dataset")
    if old is not None:
        return old
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    odd = oddities(classes * per_class, corrupt)
    manifest = {"format": FORMAT, "args": args, "classes": [wnid(c) for c in range(classes)],
                "odd": {}, "counts": {}}
    from beitfast.progress import progress_bar

    total = classes * (per_class + val_per_class)
    bar = progress_bar(total=total, desc=f"toy imagenet -> {out}", unit="img", disable=not progress)
    for split, n, sid in (("train", per_class, 0), ("val", val_per_class, 1)):
        count = 0
        for c in range(classes):
            p = class_params(c, seed)
            d = tmp / split / wnid(c)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                r = np.random.default_rng([seed, sid, c, i])
                if random_palette:  # this image's own colours, from its own stream
                    q = np.random.default_rng([seed, sid, c, i, 1])
                    p = dict(p, bg=q.uniform(0, 255, size=(2, 3)), fg=q.uniform(0, 255, size=3))
                img = render(p, r, sides)
                kind = odd.get(c * per_class + i, "jpeg") if split == "train" else "jpeg"
                name = f"{wnid(c)}_{i}.JPEG"
                if kind == "truncated":
                    data = encode(img, "jpeg")
                    data = data[: len(data) // 3]
                elif kind == "empty":
                    data = b""
                elif kind == "garbage":
                    data = r.integers(0, 256, 2048, dtype=np.uint8).tobytes()
                else:
                    data = encode(img, kind)
                (d / name).write_bytes(data)
                if kind != "jpeg":
                    manifest["odd"][f"{split}/{wnid(c)}/{name}"] = kind
                count += 1
                bar.update()
        manifest["counts"][split] = count
    bar.close()
    (tmp / "toy_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


# ----------------------------------------------------------------------------- segmentation
SEG_FORMAT = "beitfast-toy-ade20k/1"
# label values as ADE20K stores them: 0 = unlabelled (ignored after reduce_zero_label), then
# the classes; the background is labelled by its texture, the foreground by its shape
SEG_CLASSES = [f"{t} background" for t in TEXTURES] + [f"{s} shape" for s in SHAPES[:3]]


def seg_labels(p: dict, inside: np.ndarray) -> np.ndarray:
    """uint8 (H, W) label map in ADE20K's values: 1 + texture index for the background,
    1 + len(TEXTURES) + shape index inside the shape, 0 on a one-pixel ring along the
    shape's edge (unlabelled, as ADE20K leaves object borders)."""
    lab = np.full(inside.shape, 1 + TEXTURES.index(p["texture"]), np.uint8)
    if inside.any():
        lab[inside] = 1 + len(TEXTURES) + SHAPES.index(p["shape"])
        pad = np.pad(inside, 1, mode="edge")
        grow = np.zeros_like(inside)
        shrink = np.ones_like(inside)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                v = pad[dy:dy + inside.shape[0], dx:dx + inside.shape[1]]
                grow |= v
                shrink &= v
        lab[grow & ~shrink] = 0
    return lab


def make_segmentation(out: Path | str, train: int = 300, val: int = 60, classes: int = 10, seed: int = 0,
                      random_palette: bool = True, sides: tuple[int, int] = (96, 320), progress: bool = True) -> dict:
    """Write a toy semantic-segmentation set in ADE20K's layout (atomically):
    ``OUT/images/{training,validation}/toy_<n>.jpg`` and ``OUT/annotations/.../toy_<n>.png``
    (8-bit label maps, 0 = unlabelled). Image n draws the toy class n % classes, so the
    background's texture and the shape's kind follow the classification toy set; with
    `random_palette` (default) colours say nothing, so a model must see texture and shape.
    Deterministic; returns the manifest (``OUT/toy_seg_manifest.json``)."""
    if train < 1 or val < 1:
        raise ValueError(f"need at least one training and one validation image, got {train}, {val}")
    args = {"train": train, "val": val, "classes": classes, "seed": seed, "random_palette": random_palette,
            "sides": list(sides)}
    out = Path(out)
    old = _existing(out / "toy_seg_manifest.json", SEG_FORMAT, args, "a toy segmentation set")
    if old is not None:
        return old
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    from beitfast.progress import progress_bar

    counts = np.zeros(len(SEG_CLASSES) + 1, np.int64)
    bar = progress_bar(total=train + val, desc=f"toy ade20k -> {out}", unit="img", disable=not progress)
    for split, n, sid in (("training", train, 2), ("validation", val, 3)):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            c = i % classes
            p = class_params(c, seed)
            if random_palette:
                q = np.random.default_rng([seed, sid, c, i, 1])
                p = dict(p, bg=q.uniform(0, 255, size=(2, 3)), fg=q.uniform(0, 255, size=3))
            img, inside = render(p, np.random.default_rng([seed, sid, c, i]), sides, with_shape=True)
            lab = seg_labels(p, inside)
            counts += np.bincount(lab.ravel(), minlength=len(counts))
            Image.fromarray(img).save(tmp / "images" / split / f"toy_{i:05d}.jpg", quality=90)
            Image.fromarray(lab).save(tmp / "annotations" / split / f"toy_{i:05d}.png")
            bar.update()
    bar.close()
    manifest = {"format": SEG_FORMAT, "args": args, "classes": SEG_CLASSES, "counts": {"training": train, "validation": val},
                "pixels_per_label": counts.tolist()}
    (tmp / "toy_seg_manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corrupt", action="store_true", help="also write truncated, empty and garbage files")
    ap.add_argument("--imagenet-size", action="store_true", help="ImageNet-sized images (about 500 x 375)")
    ap.add_argument("--random-palette", action="store_true",
                    help="colours drawn per image: only texture and shape carry the class")
    ap.add_argument("--segmentation", action="store_true",
                    help="write the toy semantic-segmentation set instead (ADE20K layout: --per-class is the "
                         "number of training images, --val-per-class of validation images)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.segmentation:
        try:
            m = make_segmentation(a.out, a.per_class, a.val_per_class, a.classes, a.seed, True,
                                  (380, 480) if a.imagenet_size else (96, 320), not a.no_progress)
        except (ValueError, FileExistsError) as e:
            print(f"make_toy_imagenet: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {m['counts']} images with label maps ({len(m['classes'])} classes) to {a.out}")
        return 0
    try:
        m = make(a.out, a.classes, a.per_class, a.val_per_class, a.seed, a.corrupt, not a.no_progress,
                 (380, 480) if a.imagenet_size else (96, 320), a.random_palette)
    except (ValueError, FileExistsError) as e:
        print(f"make_toy_imagenet: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['counts']} images in {len(m['classes'])} classes to {a.out} "
          f"({len(m['odd'])} odd files listed in {a.out / 'toy_manifest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
