"""Finding and decoding the images of an ImageNet-layout tree, odd files included."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


class BadImage(ValueError):
    """An image file that cannot be decoded; the message names the file and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def list_imagefolder(root: str | Path, split: str = "train") -> tuple[list[str], np.ndarray, list[str]]:
    """(relative paths, int64 labels, class names) of `root/split/<class>/*`, labels being the
    index of the sorted class folder names, files sorted within a class (ImageNet order)."""
    base = Path(root) / split
    if not base.is_dir():
        raise FileNotFoundError(f"no '{split}' folder under {root} (expected ImageNet layout {base}/<class>/<image>)")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{base} holds no class folders")
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((base / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f"{split}/{name}/{f.name}")
                labels.append(c)
    return paths, np.asarray(labels, np.int64), classes


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
        raise BadImage(name, f"cannot decode ({type(e).__name__}: {e})") from None
