"""Finding and decoding the images of an ImageNet-layout tree, odd files included."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


class BadImage(ValueError):
    """An image file that cannot be decoded; the message names the file and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


UNLABELED = -1  # the label of every image of an unlabeled set


def decodable_suffixes() -> set[str]:
    """Every file extension Pillow opens (the cache re-encodes what is not a plain JPEG)."""
    from PIL import Image

    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def list_unlabeled(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(relative paths, labels all UNLABELED, no class names) of every image under `root`,
    recursively, in sorted path order: a folder of the user's own images, no classes needed."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    ok = decodable_suffixes()
    paths = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and p.suffix.lower() in ok)
    if not paths:
        raise FileNotFoundError(f"{root} holds no image files (looked recursively for {', '.join(sorted(ok)[:8])}, ...)")
    return paths, np.full(len(paths), UNLABELED, np.int64), []


def list_imagefolder(root: str | Path, split: str = "train") -> tuple[list[str], np.ndarray, list[str]]:
    """(relative paths, int64 labels, class names) of `root/split/<class>/*`, labels being the
    index of the sorted class folder names, files sorted within a class (ImageNet order)."""
    base = Path(root) / split
    if (Path(root) / "manifest.json").exists() and (Path(root) / "plan.json").exists():
        raise FileNotFoundError(f"{root} is a token cache, not an image folder: this needs labelled images in ImageNet "
                                f"layout ({root}/<split>/<class>/<image>)")
    unlabeled = (": its images carry no labels. An unlabeled set pretrains (data_prep/tokenize_imagenet.py "
                 "--unlabeled), but probing and fine-tuning need labels: images in class folders, "
                 "<split>/<class>/<image>")
    if not base.is_dir():
        loose = Path(root).is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in Path(root).rglob("*"))
        raise FileNotFoundError(f"no '{split}' folder under {root}" + (unlabeled if loose else
                                f" (expected ImageNet layout {base}/<class>/<image>)"))
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        loose = any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in base.iterdir())
        raise FileNotFoundError(f"{base} holds no class folders" + (unlabeled if loose else ""))
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((base / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f"{split}/{name}/{f.name}")
                labels.append(c)
    return paths, np.asarray(labels, np.int64), classes


def _why(e: Exception) -> str:
    """An exception as a stable reason: no object addresses, so reruns write equal reports."""
    return f"cannot decode ({type(e).__name__}: " + re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)) + ")"


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode any image Pillow reads into upright RGB uint8 (H, W, 3): CMYK and grayscale
    are converted, EXIF orientation is applied, a PNG under a .JPEG name is fine. Empty,
    truncated or undecodable data raises BadImage naming the file."""
    from PIL import Image, ImageOps

    if len(data) == 0:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise BadImage(name, _why(e)) from None


def prepare_for_cache(data: bytes, name: str = "<bytes>", max_side: int = 0, quality: int = 95) -> tuple[bytes, int, int, str]:
    """(bytes, height, width, action) of an image as the token cache stores it: a plain
    upright RGB JPEG is kept byte for byte; CMYK, grayscale, PNG, EXIF-rotated or (with
    `max_side`) larger images are decoded, made upright RGB, downscaled to `max_side` and
    re-encoded, so the GPU decoder only ever sees plain RGB JPEGs. `action` says which.
    Undecodable data raises BadImage naming the file."""
    from PIL import Image

    if len(data) == 0:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, size = im.format, im.mode, im.size
        orientation = im.getexif().get(0x0112, 1)
        im.load()  # full decode: a truncated file fails here, not later inside DALI
    except Exception as e:
        raise BadImage(name, _why(e)) from None
    w, h = size
    too_big = max_side and max(h, w) > max_side
    if fmt == "JPEG" and mode == "RGB" and orientation == 1 and not too_big:
        return data, h, w, "kept"
    rgb = decode_rgb(data, name)
    reason = "resized" if fmt == "JPEG" and mode == "RGB" and orientation == 1 else \
        f"converted {fmt} {mode}" + (f" (EXIF orientation {orientation})" if orientation != 1 else "")
    img = Image.fromarray(rgb)
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), img.size[1], img.size[0], reason


def read_decodable(root: str, files: list[str], j: int, bad: set, tag: str) -> tuple[np.ndarray, int]:
    """(RGB array, index) of files[j] under root, or of the next file in the listing that
    decodes (a pure function of j, so resumed runs read the same images). Each unreadable
    file is named on stderr once per `bad` set; BadImage when none decodes."""
    import os
    import sys

    for k in range(len(files)):
        i = (j + k) % len(files)
        path = os.path.join(root, files[i])
        try:
            with open(path, "rb") as f:
                return decode_rgb(f.read(), path), i
        except (BadImage, OSError) as e:
            if path not in bad:
                bad.add(path)
                print(f"[{tag}] skipping an unreadable image, using the next one instead: {e}", file=sys.stderr)
    raise BadImage(root, "no image under it can be decoded")
