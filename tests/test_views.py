"""Views: sampling, the batched jitter vs torchvision, DALI rendering on CPU."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.data.views import (VIEW_DTYPE, AugSpec, ViewRenderer, apply_jitter, pick_view, reference_jitter,
                                 sample_views)


def test_jitter_matches_torchvision_in_every_order():
    g = torch.Generator().manual_seed(int(np.random.randint(1 << 30)))
    img = torch.randint(0, 256, (12, 3, 17, 23), dtype=torch.uint8, generator=g)
    jit = 0.6 + 0.8 * torch.rand(12, 3, generator=g)
    order = torch.stack([torch.randperm(3, generator=g) for _ in range(12)])
    ours = apply_jitter(img, jit, order)
    for i in range(12):
        ref = reference_jitter(img[i:i + 1], jit[i], order[i])
        torch.testing.assert_close(ours[i:i + 1], ref, atol=2e-3, rtol=1e-5)  # 0..255 units: float rounding only


def test_unit_jitter_is_identity():
    img = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    out = apply_jitter(img, torch.ones(3, 3), torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2]]))
    assert torch.equal(out, img.float())


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


def test_renderer_crop_flip_and_resize_on_cpu():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    arr = np.stack([xx * 1.5, yy * 2, (xx + yy) % 255], -1).astype(np.uint8)  # a smooth gradient
    data = _jpeg(arr)
    views = np.zeros(3, VIEW_DTYPE)
    views[:] = (10, 20, 64, 96, 0, (1, 1, 1), (0, 1, 2))
    views[1]["flip"] = 1
    views[2]["jitter"] = (1.3, 1.0, 1.0)
    r = ViewRenderer(32, "lanczos", batch_size=4)
    out = r.render_uint8([data] * 3, views)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[1], out[0].flip(-1))
    ref = np.asarray(Image.fromarray(arr[10:74, 20:116]).resize((32, 32), Image.LANCZOS)).transpose(2, 0, 1)
    assert np.abs(out[0].numpy().astype(float) - ref).mean() < 3  # JPEG + resampler differences only
    jittered = r.render([data] * 3, views)
    torch.testing.assert_close(jittered[2], (out[2].float() * 1.3).clamp(0, 255))
    with pytest.raises(ValueError, match="1..4"):
        r.render_uint8([data] * 5, np.repeat(views[:1], 5))
    del rng
