"""One source of truth for an augmented view: sampling its parameters and rendering it.

The token cache (data_prep/tokenize_imagenet.py) and the training loaders both use this
module, so cached tokens always describe the pixels the model sees.

A view of an upright image of size (H, W) is (REFERENCE.md section 1):
- a RandomResizedCrop box: scale U(0.08, 1) of the area, log-uniform ratio (3/4, 4/3),
  10 tries, then the centre crop torchvision falls back to;
- a horizontal flip with p = 0.5;
- ColorJitter(0.4, 0.4, 0.4, 0): brightness, contrast, saturation factors from U(0.6, 1.4),
  applied in a random order.
Its parameters are a pure function of (seed, image index, view k, H, W).

Rendering: decode -> crop box -> resize (224 bicubic for the ViT, 112 Lanczos for the
tokenizer, both antialiased) -> flip, in DALI (CPU or GPU), then the colour jitter on the
batch in torch (`apply_jitter`, same code on CPU and GPU). Deviation from the reference
(README): jitter is applied after the crop, so contrast pivots on the crop's mean grey,
not the full image's, and clamping happens after resampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# One view's parameters. order[i] is the op applied i-th: 0 brightness, 1 contrast, 2 saturation.
VIEW_DTYPE = np.dtype([("y", "<i4"), ("x", "<i4"), ("h", "<i4"), ("w", "<i4"), ("flip", "u1"),
                       ("jitter", "<f4", (3,)), ("order", "u1", (3,))])
_KEY_VIEWS = 0x5EED_F00D


@dataclass(frozen=True)
class AugSpec:
    """The augmentation settings a cache was built with (recorded in its manifest)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.4  # brightness = contrast = saturation strength; hue 0

    @classmethod
    def from_config(cls, data_cfg) -> "AugSpec":
        return cls(tuple(data_cfg.crop_scale), tuple(data_cfg.crop_ratio), data_cfg.hflip, data_cfg.color_jitter)

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip, "jitter": self.jitter}


def sample_crop(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """(y, x, ch, cw) of a RandomResizedCrop box, torchvision's algorithm and fallback."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return y, x, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def sample_views(seed: int, index: int, h: int, w: int, k: int, aug: AugSpec) -> np.ndarray:
    """K views of image `index` (upright size h x w): a (k,) VIEW_DTYPE array, a pure
    function of its arguments."""
    out = np.zeros(k, VIEW_DTYPE)
    for v in range(k):
        rng = np.random.default_rng([_KEY_VIEWS, seed, index, v])
        out[v]["y"], out[v]["x"], out[v]["h"], out[v]["w"] = sample_crop(rng, h, w, aug.scale, aug.ratio)
        out[v]["flip"] = rng.random() < aug.hflip
        out[v]["jitter"] = rng.uniform(max(0.0, 1 - aug.jitter), 1 + aug.jitter, 3)
        out[v]["order"] = rng.permutation(3)
    return out


def pick_view(seed: int, epoch: int, index: np.ndarray | int, k: int) -> np.ndarray:
    """Which of the K cached views image `index` uses in `epoch`: a hash of the three, so
    independent of workers, batch size and world size."""
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 wrap-around is the hash
        return _pick(idx, seed, epoch, k)


def _pick(idx, seed, epoch, k):
    z = (idx * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64((seed * 0xBF58476D1CE4E5B9 + epoch * 0x94D049BB133111EB)
                                                         & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(31))) * np.uint64(0xD6E8FEB86659FD93)
    z ^= z >> np.uint64(32)
    return (z % np.uint64(k)).astype(np.int64)


# ----------------------------------------------------------------------------- jitter
def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB (B, 3, H, W) -> (B, 1, H, W) with torchvision's weights."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def apply_jitter(img: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Colour jitter of a batch: img uint8 (B, 3, H, W); jitter float (B, 3) factors
    (brightness, contrast, saturation); order int (B, 3), the op applied in each slot.
    Each op blends as torchvision's adjust_* and clamps to [0, 255]; returns float32
    (B, 3, H, W) in [0, 255] (not rounded: callers normalise or round)."""
    x = img.float()
    jitter = jitter.to(x.device, torch.float32)
    order = order.to(x.device)
    for slot in range(3):
        # Every op runs in every slot, with factor 1 (an exact no-op) unless it is the op
        # that sample's order puts there: per-sample order without per-sample branching.
        for op in range(3):
            f = torch.where(order[:, slot] == op, jitter[:, op], torch.ones_like(jitter[:, op]))[:, None, None, None]
            if op == 0:
                x = x * f
            elif op == 1:
                x = f * x + (1 - f) * _gray(x).mean(dim=(2, 3), keepdim=True)
            else:
                x = f * x + (1 - f) * _gray(x)
            x = x.clamp_(0, 255)
    return x


def reference_jitter(img: torch.Tensor, jitter, order) -> torch.Tensor:
    """Twin of `apply_jitter` for one image through torchvision's functional ops, in order."""
    import torchvision.transforms.v2.functional as TF

    x = img.float() / 255
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for op in order:
        x = ops[int(op)](x, float(jitter[int(op)]))
    return x * 255


# ----------------------------------------------------------------------------- rendering
class ViewRenderer:
    """A DALI pipeline rendering views: encoded image bytes + crop boxes + flips ->
    uint8 (B, 3, size, size) tensors (jitter not applied; see `render`).

    `device`: "cpu" (CPU decoder and resize) or "gpu" (nvJPEG 'mixed' decoder, GPU resize).
    `interp`: "lanczos" (the tokenizer view) or "cubic" (the ViT view); both antialiased."""

    def __init__(self, size: int, interp: str, batch_size: int, device: str = "cpu", num_threads: int = 2,
                 device_id: int = 0):
        from nvidia.dali import fn, pipeline_def, types

        self.size, self.batch_size, self.device, self.device_id = size, batch_size, device, device_id
        interp_type = {"lanczos": types.INTERP_LANCZOS3, "cubic": types.INTERP_CUBIC}[interp]
        gpu = device == "gpu"

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)
            end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            img = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            # ROI in (y, x) order, absolute pixels of the upright decoded image
            img = fn.resize(img, size=[size, size], roi_start=start, roi_end=end, roi_relative=False,
                            interp_type=interp_type, antialias=True)
            img = fn.flip(img, horizontal=flip)
            return fn.transpose(img, perm=[2, 0, 1])  # HWC -> CHW

        self.pipe = pipe()
        self.pipe.build()

    def render_uint8(self, jpegs: list[np.ndarray], views: np.ndarray) -> torch.Tensor:
        """uint8 (n, 3, size, size) for n <= batch_size (encoded bytes, VIEW_DTYPE views)."""
        n = len(jpegs)
        if n == 0 or n > self.batch_size:
            raise ValueError(f"render takes 1..{self.batch_size} views, got {n}")
        pad = self.batch_size - n  # DALI runs full batches: repeat the last view
        jpegs = list(jpegs) + [jpegs[-1]] * pad
        views = np.concatenate([views, np.repeat(views[-1:], pad)])
        start = np.stack([views["y"], views["x"]], 1).astype(np.float32)
        end = start + np.stack([views["h"], views["w"]], 1).astype(np.float32)
        self.pipe.feed_input("jpegs", jpegs)
        self.pipe.feed_input("start", list(start))
        self.pipe.feed_input("end", list(end))
        self.pipe.feed_input("flip", [np.array(f, np.int32) for f in views["flip"]])
        (out,) = self.pipe.run()
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = torch.empty((self.batch_size, 3, self.size, self.size), dtype=torch.uint8,
                            device=torch.device("cuda", self.device_id))
            feed_ndarray(out.as_tensor(), t)
        else:
            t = torch.from_numpy(np.array(out.as_tensor()))
        return t[:n]

    def render(self, jpegs: list[np.ndarray], views: np.ndarray) -> torch.Tensor:
        """float32 (n, 3, size, size) in [0, 255]: the rendered views with their jitter."""
        x = self.render_uint8(jpegs, views)
        return apply_jitter(x, torch.from_numpy(views["jitter"].copy()), torch.from_numpy(views["order"].astype(np.int64)))
