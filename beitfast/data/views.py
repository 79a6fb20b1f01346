"""One source of truth for an augmented view: sampling its parameters and rendering it.

The token cache (data_prep/tokenize_imagenet.py) and the training loaders both use this
module, so cached tokens always describe the pixels the model sees.

A view of an upright image of size (H, W) is (REFERENCE.md section 1):
- a RandomResizedCrop box: scale U(0.08, 1) of the area, log-uniform ratio (3/4, 4/3),
  10 tries, then the centre crop torchvision falls back to;
- a horizontal flip with p = 0.5;
- ColorJitter(0.4, 0.4, 0.4, 0): brightness, contrast, saturation factors from U(0.6, 1.4),
  applied in a random order;
- the contrast pivot: the mean grey that the reference's contrast op blends towards. The
  reference jitters the WHOLE image before cropping, so its pivot is
  int(mean(L) + 0.5) of the whole image as the earlier ops left it (Pillow's ImageEnhance);
  `contrast_pivots` computes exactly that when the views are made (the tokenization stage
  has the whole image) and the cache stores it.
The parameters are a pure function of (seed, image index, view k, H, W); the pivot of the
image's pixels too.

Rendering (`dali_view`, one DALI graph used by tokenization and training): decode only the
crop box (ROI decoding on the CPU; the 'mixed' GPU decoder on a GPU) -> the three jitter ops
in the view's order, each a per-pixel affine map (contrast with the stored pivot), rounded
down and clamped to uint8 as Pillow does -> resize (224 bicubic for the ViT, 112 Lanczos for
the tokenizer, antialiased) -> flip (and, for the ViT, normalisation). Brightness,
saturation and contrast with the stored pivot are per-pixel maps, so jittering the decoded
crop gives exactly the pixels of the reference's jittered whole image inside the box (same
clamping, rounding up to float arithmetic); what remains is the resampler (DALI's vs
Pillow's; measured in the README).
`apply_jitter` is the torch twin of the DALI jitter; `reference_view` renders a view the way
the reference does (Pillow and torchvision: jitter the whole image, flip, crop, resize).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from beitfast.data.resample import jitter_into

# One view's parameters. order[i] is the op applied i-th: 0 brightness, 1 contrast, 2 saturation.
# pivot: the contrast op's grey level (0..255) on the whole image, as the reference computes it.
VIEW_DTYPE = np.dtype([("y", "<i4"), ("x", "<i4"), ("h", "<i4"), ("w", "<i4"), ("flip", "u1"),
                       ("jitter", "<f4", (3,)), ("order", "u1", (3,)), ("pivot", "<f4")])
# Pillow's RGB -> L weights (ITU-R 601-2 luma, 16-bit fixed point), used by its saturation op
LUMA = np.array([19595, 38470, 7471], np.float64) / 65536
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


def sample_views(seed: int, index: int, h: int, w: int, k: int, aug: AugSpec, first: int = 0) -> np.ndarray:
    """Views first .. first + k - 1 of image `index` (upright size h x w): a (k,) VIEW_DTYPE
    array, a pure function of its arguments. The cache stores views 0 .. K-1; online targets
    use view e in epoch e (an unlimited cache, as it were)."""
    out = np.zeros(k, VIEW_DTYPE)
    for i, v in enumerate(range(first, first + k)):
        rng = np.random.default_rng([_KEY_VIEWS, seed, index, v])
        out[i]["y"], out[i]["x"], out[i]["h"], out[i]["w"] = sample_crop(rng, h, w, aug.scale, aug.ratio)
        out[i]["flip"] = rng.random() < aug.hflip
        out[i]["jitter"] = rng.uniform(max(0.0, 1 - aug.jitter), 1 + aug.jitter, 3)
        out[i]["order"] = rng.permutation(3)
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
def _pil_op(img, op: int, factor: float):
    from PIL import ImageEnhance

    return (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[op](img).enhance(float(factor))


def contrast_pivots(img, views: np.ndarray) -> np.ndarray:
    """The reference's contrast pivot of each view: Pillow's ImageEnhance.Contrast grey level,
    int(mean(L) + 0.5), of the WHOLE upright image (a PIL RGB image) after the ops the view
    applies before contrast, exactly as the reference computes it. float32 (K,)."""
    from PIL import ImageStat

    out = np.zeros(len(views), np.float32)
    for i, v in enumerate(views):
        x = img
        for op in v["order"]:
            if op == 1:
                break
            x = _pil_op(x, int(op), v["jitter"][op])
        out[i] = int(ImageStat.Stat(x.convert("L")).mean[0] + 0.5)
    return out


def jitter_matrices(views: np.ndarray) -> np.ndarray:
    """float32 (n, 3, 3, 4): for each view and slot, the affine map [M | T] (out = M @ rgb + T,
    0..255 units) of the op the view applies in that slot: brightness f*x; contrast
    f*x + (1-f)*pivot; saturation f*x + (1-f)*luma(x). Each op's result is rounded down and
    clamped to 0..255 before the next, as Pillow's blend does."""
    n = len(views)
    out = np.zeros((n, 3, 3, 4), np.float64)
    eye = np.eye(3)
    for i, v in enumerate(views):
        for slot, op in enumerate(v["order"]):
            f = float(v["jitter"][op])
            if op == 0:
                m, t = f * eye, 0.0
            elif op == 1:
                m, t = f * eye, (1 - f) * float(v["pivot"])
            else:
                m, t = f * eye + (1 - f) * np.outer(np.ones(3), LUMA), 0.0
            out[i, slot, :, :3], out[i, slot, :, 3] = m, t
    return out.astype(np.float32)


def apply_jitter(img: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Torch twin of the DALI jitter: img uint8 (B, 3, H, W), mats (B, 3, 3, 4) from
    `jitter_matrices`; per slot out = floor(clamp(M @ rgb + T, 0, 255)). Returns uint8."""
    x = img.double()
    mats = mats.to(x.device, torch.float64)
    for slot in range(3):
        m, t = mats[:, slot, :, :3], mats[:, slot, :, 3]
        x = (torch.einsum("bij,bjhw->bihw", m, x) + t[:, :, None, None]).clamp(0, 255).floor()
    return x.to(torch.uint8)


def reference_views(img, view, outputs) -> list:
    """A view rendered as the reference code renders it, for the reference backend, the
    online targets and as the twin the DALI rendering is measured against: torchvision's
    functional ops on a PIL image, ColorJitter on the whole image (the view's factors, in its
    order), horizontal flip, then the crop box (mirrored when flipped: the reference crops the
    flipped image) resized with Pillow, once per (size, interp) in `outputs` ("cubic" or
    "lanczos"), from the same crop, as the reference's two-picture crop does. PIL images."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    for op in view["order"]:
        img = _pil_op(img, int(op), view["jitter"][op])
    x, w = int(view["x"]), int(view["w"])
    if view["flip"]:
        img = TF.hflip(img)
        x = img.width - x - w
    crop = img.crop((x, int(view["y"]), x + w, int(view["y"]) + int(view["h"])))
    return [crop.resize((size, size), {"cubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[interp])
            for size, interp in outputs]


def reference_view(img, view, size: int, interp: str):
    """One output of `reference_views`."""
    return reference_views(img, view, [(size, interp)])[0]


# ----------------------------------------------------------------------------- rendering
INTERP = ("lanczos", "cubic")  # the tokenizer view, the ViT view


def _jitter_setup(outs, ins):
    for i in range(len(outs[0])):
        for d in range(3):
            outs[0][i][d] = ins[0][i][d]


def _jitter_run(out, img, m):
    """DALI's per-sample Numba body: resample.jitter_into (uint8 HWC, m (3, 3, 4))."""
    jitter_into(out, img, m)


def coord_jitter(img, mats):
    """The jitter slots as three coord_transform ops (the GPU graph's; they run on CPU nodes
    too, which is how the tests check them): DALI rounds half away from zero, so T - 0.5 turns
    its rounding into Pillow's rounding down; float arithmetic lands 1 apart from the integer
    tables at rare exact ties (under 1% of pixels, tested)."""
    from nvidia.dali import fn, types

    for s in range(3):
        img = fn.coord_transform(img, M=mats[s, :, 0:3], T=mats[s, :, 3] - 0.5, dtype=types.UINT8)
    return img


def dali_jitter(img, mats, device: str):
    """The view's jitter slots in order, each out = floor(clamp(M @ rgb + T, 0, 255)), on DALI
    nodes. CPU: one Numba pass for the three slots (resample.jitter_into: tables for
    brightness and contrast, one 3x3 map for saturation), the FFCV backend's pass (DALI's own
    compile of it can land a float tie 1 apart, tested); DALI compiles this operator each time
    a pipeline is built (about 3.5 s on the 2-core VM). GPU: coord_jitter."""
    from nvidia.dali import types

    if device == "cpu":
        from nvidia.dali.plugin.numba.fn.experimental import numba_function

        return numba_function(img, mats, run_fn=_jitter_run, setup_fn=_jitter_setup, out_types=[types.UINT8],
                              in_types=[types.UINT8, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 3],
                              batch_processing=False)
    return coord_jitter(img, mats)


def dali_view(jpegs, start, shape, flip, mats, size: int, interp: str, device: str, normalize=None, dtype=None,
              hw_decoder_load: float = 0.65):
    """The view graph (DALI DataNodes in, one DataNode out), shared by every DALI pipeline.

    jpegs: encoded bytes; start, shape: int32 (y, x) and (h, w) of the crop box; flip: int32
    scalar; mats: float32 (3, 3, 4), the jitter slots of `jitter_matrices`. device: "cpu" or
    "gpu". Returns CHW: uint8 when normalize is None, else (x / 255 - mean) / std as
    normalize = (mean, std) in `dtype` (FLOAT or FLOAT16). hw_decoder_load: the share of images
    the GPU decoder sends to the hardware JPEG engine."""
    from nvidia.dali import fn, types

    gpu = device == "gpu"
    # ROI decoding: only the crop box is decoded (libjpeg-turbo on the CPU; nvJPEG with the
    # hardware engine on a GPU, chroma upsampled as on the CPU so both decoders agree)
    img = fn.decoders.image_slice(jpegs, start, shape, axis_names="HW", output_type=types.RGB,
                                  device="mixed" if gpu else "cpu",
                                  **({"jpeg_fancy_upsampling": True, "hw_decoder_load": hw_decoder_load} if gpu else {}))
    # the jitter on the decoded crop, before resampling: per-pixel maps on the very pixels the
    # reference jitters (its whole image restricted to the box), so they clamp where its clamp
    img = dali_jitter(img, mats, device)
    img = fn.resize(img, size=[size, size], antialias=True,
                    interp_type={"lanczos": types.INTERP_LANCZOS3, "cubic": types.INTERP_CUBIC}[interp])
    if normalize is None:
        return fn.crop_mirror_normalize(img, mirror=flip, dtype=types.UINT8, output_layout="CHW")
    mean, std = normalize
    return fn.crop_mirror_normalize(img, mirror=flip, dtype=dtype, output_layout="CHW",
                                    mean=[255 * m for m in mean], std=[255 * s for s in std])


def view_inputs(views: np.ndarray) -> dict:
    """Per-sample arrays the view graph reads, for n views: start, shape, flip and the jitter
    slots (lists of numpy arrays, DALI's per-sample format)."""
    return {"start": [np.array([v["y"], v["x"]], np.int32) for v in views],
            "shape": [np.array([v["h"], v["w"]], np.int32) for v in views],
            "flip": [np.array(v["flip"], np.int32) for v in views],
            "mats": list(jitter_matrices(views))}


class ViewRenderer:
    """A DALI pipeline that renders views fed one batch at a time (tokenization, cache
    verification, pictures): encoded image bytes + VIEW_DTYPE views -> uint8 (n, 3, size,
    size) through `dali_view`. device: "cpu" or "gpu" (the 'mixed' decoder); interp:
    "lanczos" (the tokenizer view) or "cubic" (the ViT view)."""

    def __init__(self, size: int, interp: str, batch_size: int, device: str = "cpu", num_threads: int = 2,
                 device_id: int = 0):
        from nvidia.dali import fn, pipeline_def, types

        self.size, self.batch_size, self.device, self.device_id = size, batch_size, device, device_id

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            mats = fn.external_source(name="mats", dtype=types.FLOAT, ndim=3)
            return dali_view(jpegs, start, shape, flip, mats, size, interp, device)

        self.pipe = pipe()
        self.pipe.build()

    def render(self, jpegs: list[np.ndarray], views: np.ndarray) -> torch.Tensor:
        """uint8 (n, 3, size, size), n <= batch_size (encoded bytes, VIEW_DTYPE views), on the
        pipeline's device."""
        n = len(jpegs)
        if n == 0 or n > self.batch_size:
            raise ValueError(f"render takes 1..{self.batch_size} views, got {n}")
        pad = self.batch_size - n  # DALI runs full batches: repeat the last view
        jpegs = list(jpegs) + [jpegs[-1]] * pad
        views = np.concatenate([views, np.repeat(views[-1:], pad)])
        for name, arrays in {"jpegs": jpegs, **view_inputs(views)}.items():
            self.pipe.feed_input(name, arrays)
        (out,) = self.pipe.run()
        if self.device == "gpu":
            import nvidia.dali.plugin.pytorch as dali_torch

            t = torch.empty((self.batch_size, 3, self.size, self.size), dtype=torch.uint8,
                            device=torch.device("cuda", self.device_id))
            # the copy runs on torch's current stream, so whatever reads `t` next is ordered after it
            dali_torch.feed_ndarray(out.as_tensor(), t, cuda_stream=torch.cuda.current_stream(t.device))
        else:
            t = torch.from_numpy(np.array(out.as_tensor()))
        return t[:n]
