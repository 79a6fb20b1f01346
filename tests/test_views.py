"""Views: sampling, the batched jitter vs torchvision, DALI rendering on CPU."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.data.views import (VIEW_DTYPE, AugSpec, ViewRenderer, apply_jitter, contrast_pivots, jitter_matrices,
                                 pick_view, sample_views)


def _views(n, rng, h=40, w=56):
    """n random views of an h x w image: boxes, flips, factors in [0.6, 1.4], random orders."""
    v = np.zeros(n, VIEW_DTYPE)
    for i in range(n):
        v[i]["h"], v[i]["w"] = rng.integers(8, h + 1), rng.integers(8, w + 1)
        v[i]["y"], v[i]["x"] = rng.integers(0, h - v[i]["h"] + 1), rng.integers(0, w - v[i]["w"] + 1)
        v[i]["flip"] = rng.random() < 0.5
        v[i]["jitter"] = rng.uniform(0.6, 1.4, 3)
        v[i]["order"] = rng.permutation(3)
    return v


def _photo(rng, h=40, w=56):
    """A smooth picture with saturated regions (where clamping matters) and noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 6, yy * 7, 255 - xx * 3], -1) + rng.normal(0, 25, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_jitter_after_the_crop_equals_the_reference_jitter_of_the_whole_image():
    """The reference jitters the WHOLE image with Pillow (contrast pivoting on its grey mean as
    the earlier ops left it) and then crops; we jitter the crop with the stored pivot. Per
    pixel the two agree up to rounding (Pillow's saturation blends with an integer grey, ours
    with the exact one; a later op with a factor above 1 can amplify a one-level difference
    to a few), in every op order; a pivot taken
    from the crop instead (the control) would not."""
    from beitfast.data.views import _pil_op

    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    for _ in range(6):
        arr = _photo(rng)
        img = Image.fromarray(arr)
        views = _views(8, rng)
        views["pivot"] = contrast_pivots(img, views)
        for v in views:
            ref = img
            for op in v["order"]:
                ref = _pil_op(ref, int(op), v["jitter"][op])
            box = (int(v["x"]), int(v["y"]), int(v["x"] + v["w"]), int(v["y"] + v["h"]))
            want = torch.from_numpy(np.array(ref.crop(box))).permute(2, 0, 1)
            crop = torch.from_numpy(arr[box[1]:box[3], box[0]:box[2]].copy()).permute(2, 0, 1)[None]
            got = apply_jitter(crop, torch.from_numpy(jitter_matrices(v[None])))[0]
            diff = (got.int() - want.int()).abs()
            assert diff.max() <= 4 and diff.float().mean() < 0.2, (v, diff.max(), diff.float().mean())
            if abs(v["jitter"][1] - 1) > 0.2:  # control: the crop's own grey mean as the pivot
                wrong = v.copy()
                wrong["pivot"] = contrast_pivots(img.crop(box), v[None])[0]
                # the wrong pivot shifts pixels by about |f - 1| x the pivots' difference
                if abs(wrong["pivot"] - v["pivot"]) * abs(v["jitter"][1] - 1) >= 1.5:
                    bad = apply_jitter(crop, torch.from_numpy(jitter_matrices(wrong[None])))[0]
                    assert (bad.int() - want.int()).abs().float().mean() > 0.5


def test_unit_jitter_is_identity():
    img = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    v = np.zeros(3, VIEW_DTYPE)
    v["jitter"], v["order"], v["pivot"] = 1, [(0, 1, 2), (2, 1, 0), (1, 0, 2)], 77
    assert torch.equal(apply_jitter(img, torch.from_numpy(jitter_matrices(v))), img)


def test_sample_views_properties():
    aug = AugSpec()
    h, w = 300, 450
    v = sample_views(3, 17, h, w, 2000, aug)
    assert v.dtype == VIEW_DTYPE and v.shape == (2000,)
    np.testing.assert_array_equal(v, sample_views(3, 17, h, w, 2000, aug))  # pure function
    assert not np.array_equal(v, sample_views(4, 17, h, w, 2000, aug))
    assert (v["y"] >= 0).all() and (v["x"] >= 0).all() and (v["y"] + v["h"] <= h).all() and (v["x"] + v["w"] <= w).all()
    frac = v["h"] * v["w"] / (h * w)
    assert 0.07 < frac.min() and frac.max() <= 1.0
    # the box distribution is torchvision's RandomResizedCrop's (its own sampler, another RNG)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                   for _ in range(2000)])
    tv_frac = tv[:, 2] * tv[:, 3] / (h * w)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(frac, q) - np.quantile(tv_frac, q)) < 0.04, q
    assert abs(np.median(v["w"] / v["h"]) - np.median(tv[:, 3] / tv[:, 2])) < 0.05
    assert abs(v["flip"].mean() - 0.5) < 0.04
    assert (v["jitter"] >= 0.6).all() and (v["jitter"] <= 1.4).all()
    assert all(sorted(o) == [0, 1, 2] for o in v["order"])
    # the first view is the same whatever K is
    np.testing.assert_array_equal(sample_views(3, 17, h, w, 1, aug)[0], v[0])


def test_tiny_image_falls_back_to_centre_crop():
    v = sample_views(0, 0, 5, 200, 20, AugSpec(scale=(0.9, 1.0)))
    assert (v["h"] <= 5).all() and (v["x"] + v["w"] <= 200).all() and (v["w"] / v["h"] <= 4 / 3 + 0.2).all()


def test_pick_view_deterministic_and_balanced():
    a = pick_view(1, 5, np.arange(100_000), 10)
    np.testing.assert_array_equal(a, pick_view(1, 5, np.arange(100_000), 10))
    assert a.min() == 0 and a.max() == 9
    assert np.abs(np.bincount(a) / 1e5 - 0.1).max() < 0.005
    b = pick_view(1, 6, np.arange(100_000), 10)
    assert (a != b).mean() > 0.85
    assert pick_view(1, 5, 12345, 10) == a[12345]


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_renderer_crop_flip_resize_and_jitter_on_cpu():
    """DALI's rendering of stored views: the crop box, the flip, the resize (against Pillow's
    crop-then-resize, as the reference: resampler rounding only) and the jitter (against its
    twin on the full-resolution crop, when the view is rendered at its own size)."""
    rng = np.random.default_rng(0)
    arr = _photo(rng, 120, 160)
    data = _jpeg(arr)
    decoded = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
    views = np.zeros(3, VIEW_DTYPE)
    views[:] = (10, 20, 64, 96, 0, (1, 1, 1), (0, 1, 2), 0)
    views[1]["flip"] = 1
    r = ViewRenderer(32, "lanczos", batch_size=4)
    out = r.render([data] * 3, views)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[1], out[0].flip(-1))
    ref = np.asarray(Image.fromarray(decoded[10:74, 20:116]).resize((32, 32), Image.LANCZOS)).transpose(2, 0, 1)
    assert np.abs(out[0].numpy().astype(float) - ref).mean() < 1  # resampler rounding only
    # jitter: a square view rendered at its own size (no resampling) equals the twin
    jv = _views(4, rng, 120, 160)
    jv["h"] = jv["w"] = 48
    jv["y"], jv["x"] = rng.integers(0, 72, 4), rng.integers(0, 112, 4)
    jv["pivot"] = contrast_pivots(Image.fromarray(decoded), jv)
    got = ViewRenderer(48, "cubic", batch_size=4).render([data] * 4, jv)
    crops = torch.stack([torch.from_numpy(decoded[v["y"]:v["y"] + 48, v["x"]:v["x"] + 48].copy()).permute(2, 0, 1)
                         for v in jv])
    twin = apply_jitter(crops, torch.from_numpy(jitter_matrices(jv)))
    twin = torch.stack([t.flip(-1) if v["flip"] else t for t, v in zip(twin, jv)])
    diff = (got.int() - twin.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.02, (diff.max(), diff.float().mean())
    with pytest.raises(ValueError, match="1..4"):
        r.render([data] * 5, np.repeat(views[:1], 5))


def test_gpu_jitter_ops_agree_with_the_numba_pass():
    """The GPU graph's jitter (views.coord_jitter: three coord_transform ops, run here on CPU
    nodes) against resample.jitter_into (the CPU graph's and the FFCV backend's Numba pass), on
    fresh random images and views: equal but for float ties rounding 1 apart, on under 1% of the
    pixels (each op rounds to uint8, so a tie 1 apart in an early op that a later factor above 1
    scales lands 2 apart: seen once in about ten runs of 64 fresh images). So is the CPU graph's own jitter (dali_jitter on "cpu": jitter_into again, compiled
    by DALI's Numba wrapper, whose float code can land a tie 1 apart too)."""
    from nvidia.dali import fn, pipeline_def, types

    from beitfast.data.resample import jitter_into
    from beitfast.data.views import coord_jitter, dali_jitter

    rng = np.random.default_rng()
    n = 64
    imgs = [rng.integers(0, 256, (int(rng.integers(8, 60)), int(rng.integers(8, 60)), 3), dtype=np.uint8)
            for _ in range(n)]
    mats = list(jitter_matrices(_views(n, rng, 100, 100)).astype(np.float32))

    @pipeline_def(batch_size=n, num_threads=2, device_id=None)
    def pipe():
        img = fn.external_source(source=lambda: imgs, batch=True, dtype=types.UINT8, layout="HWC")
        m = fn.external_source(source=lambda: mats, batch=True, dtype=types.FLOAT)
        return coord_jitter(img, m), dali_jitter(img, m, "cpu")

    p = pipe()
    p.build()
    gpu_ops, cpu_op = p.run()
    changed, off, total = 0, {"gpu": 0, "cpu": 0}, 0
    for i in range(n):
        want = np.empty_like(imgs[i])
        jitter_into(want, imgs[i], mats[i])
        for name, got in (("gpu", gpu_ops), ("cpu", cpu_op)):
            d = np.abs(np.asarray(got[i]).astype(int) - want)
            assert d.max() <= 2, (name, i, d.max())  # a tie 1 apart in an early op, then a factor > 1
            off[name] += int((d != 0).sum())
        total += want.size
        changed += not np.array_equal(want, imgs[i])
    assert changed > n // 2, changed  # the views do jitter
    assert off["gpu"] < 0.01 * total and off["cpu"] < 0.01 * total, (off, total)
