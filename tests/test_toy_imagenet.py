"""The toy ImageNet: layout, determinism, oddities, learnability."""
import hashlib
import json
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.make_toy_imagenet import main, make


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_counts(toy_root):
    classes = sorted(d.name for d in (toy_root / "train").iterdir())
    assert len(classes) == 4 and all(c.startswith("n") and len(c) == 9 for c in classes)
    for c in classes:
        files = sorted((toy_root / "train" / c).iterdir())
        assert len(files) == 30 and all(f.name.startswith(c + "_") and f.suffix == ".JPEG" for f in files)
        assert len(list((toy_root / "val" / c).iterdir())) == 5


def test_deterministic(tmp_path, toy_root):
    a = make(tmp_path / "a", classes=4, per_class=30, val_per_class=5, seed=1, corrupt=True, progress=False)
    assert _digest(tmp_path / "a") == _digest(toy_root)
    make(tmp_path / "b", classes=4, per_class=30, val_per_class=5, seed=2, corrupt=True, progress=False)
    assert _digest(tmp_path / "b") != _digest(toy_root)
    # re-running with the same arguments is a no-op; other arguments are refused
    assert make(tmp_path / "a", classes=4, per_class=30, val_per_class=5, seed=1, corrupt=True, progress=False) == a
    with pytest.raises(FileExistsError):
        make(tmp_path / "a", classes=5, per_class=30, val_per_class=5, seed=1, progress=False)


def test_every_oddity_present(toy_root):
    import json

    odd = json.loads((toy_root / "toy_manifest.json").read_text())["odd"]
    kinds = sorted(set(odd.values()))
    assert kinds == ["cmyk", "empty", "exif", "garbage", "gray", "png", "truncated"]
    for rel, kind in odd.items():
        data = (toy_root / rel).read_bytes()
        if kind == "empty":
            assert data == b""
            continue
        if kind in ("truncated", "garbage"):
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            continue
        im = Image.open(io.BytesIO(data))
        assert rel.endswith(".JPEG")
        assert {"cmyk": "CMYK", "gray": "L", "png": "RGB", "exif": "RGB"}[kind] == im.mode
        assert im.format == ("PNG" if kind == "png" else "JPEG")
        if kind == "exif":
            assert im.getexif()[0x0112] == 6
            upright = ImageOps.exif_transpose(im)
            assert upright.size == im.size[::-1]


def test_exif_rotation_restores_the_picture(tmp_path):
    from data_prep.make_toy_imagenet import class_params, encode, render

    img = render(class_params(0, 0), np.random.default_rng(0))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encode(img, "exif")))), np.float32)
    assert upright.shape == img.shape
    assert np.abs(upright - img).mean() < 6  # JPEG error only; a wrong rotation is ~50


def _colour_histogram_accuracy(root, classes=4):
    """Validation accuracy of a nearest-centroid classifier on colour histograms."""
    def feats(split):
        X, y = [], []
        for ci, c in enumerate(sorted((root / split).iterdir())):
            for f in sorted(c.iterdir()):
                try:
                    im = ImageOps.exif_transpose(Image.open(f)).convert("RGB").resize((32, 32))
                except OSError:
                    continue
                a = np.asarray(im, np.float32) / 255
                X.append(np.concatenate([np.histogram(a[..., k], 8, (0, 1))[0] for k in range(3)]))
                y.append(ci)
        return np.array(X, np.float32), np.array(y)

    Xt, yt = feats("train")
    Xv, yv = feats("val")
    cent = np.stack([Xt[yt == k].mean(0) for k in range(classes)])
    pred = np.argmin(((Xv[:, None] - cent[None]) ** 2).sum(-1), 1)
    return (pred == yv).mean()


def test_classes_are_separable(toy_root):
    """A nearest-centroid classifier on colour histograms beats chance by far."""
    assert _colour_histogram_accuracy(toy_root) >= 0.75  # chance is 0.25


def test_random_palette_leaves_colour_no_clue(tmp_path):
    """With a palette drawn per image, colour histograms are near chance: only texture and
    shape carry the class, so a probe must use learnt features to score."""
    make(tmp_path / "rp", classes=4, per_class=30, val_per_class=15, seed=1, progress=False, random_palette=True)
    assert _colour_histogram_accuracy(tmp_path / "rp") < 0.45
    m = json.loads((tmp_path / "rp" / "toy_manifest.json").read_text())
    assert m["args"]["random_palette"] is True


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--classes", "0", "--no-progress"]) == 2
    assert "classes" in capsys.readouterr().err
