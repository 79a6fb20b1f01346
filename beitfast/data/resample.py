"""Pillow's antialiased resampling (bicubic, Lanczos) and the view's jitter in Numba, for
loaders that render inside compiled code (the FFCV backend). Pillow is the twin: the
reference code resizes with it, and `resize` here reproduces its 8-bit algorithm bit for
bit (tested): separable filters scaled by the downscale factor, coefficients normalised and
rounded to 22-bit fixed point, a horizontal pass into a uint8 image, then a vertical pass.
"""
from __future__ import annotations

import math

import numpy as np

from beitfast.jit import njit

PRECISION_BITS = 32 - 8 - 2
BICUBIC, LANCZOS = 0, 1
SUPPORT = (2.0, 3.0)


@njit
def _filter(kind: int, x: float) -> float:
    if kind == BICUBIC:
        a = -0.5
        if x < 0.0:
            x = -x
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    if -3.0 <= x < 3.0:  # Lanczos: sinc(x) sinc(x / 3)
        s1 = 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)
        s3 = 1.0 if x == 0.0 else math.sin(x * math.pi / 3) / (x * math.pi / 3)
        return s1 * s3
    return 0.0


@njit
def coefficients(in_size: int, in0: float, in1: float, out_size: int, kind: int):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: (bounds (out, 2) int64: first input
    index and count; kk (out, ksize) int64 fixed-point weights)."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT[kind] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    kk = np.zeros((out_size, ksize), np.int64)
    w = np.zeros(ksize, np.float64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = int(center - support + 0.5)  # C's (int): truncation towards zero
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        ww = 0.0
        for x in range(xmax):
            w[x] = _filter(kind, (x + xmin - center + 0.5) * ss)
            ww += w[x]
        for x in range(xmax):
            v = w[x] / ww if ww != 0.0 else w[x]
            kk[xx, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, kk


@njit
def _clip8(ss: int) -> int:
    v = ss >> PRECISION_BITS
    return 0 if v < 0 else (255 if v > 255 else v)


@njit
def resize(src: np.ndarray, out_h: int, out_w: int, kind: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (out_h, out_w, C), exactly as Pillow's Image.resize."""
    h, w, c = src.shape
    bh, kh = coefficients(w, 0.0, float(w), out_w, kind)
    bv, kv = coefficients(h, 0.0, float(h), out_h, kind)
    half = 1 << (PRECISION_BITS - 1)
    if out_w != w:
        first, last = bv[0, 0], bv[out_h - 1, 0] + bv[out_h - 1, 1]
        tmp = np.empty((last - first, out_w, c), np.uint8)
        for y in range(last - first):
            for xx in range(out_w):
                x0, n = bh[xx, 0], bh[xx, 1]
                for ch in range(c):
                    ss = half
                    for x in range(n):
                        ss += int(src[y + first, x0 + x, ch]) * kh[xx, x]
                    tmp[y, xx, ch] = _clip8(ss)
        bv = bv.copy()
        bv[:, 0] -= first
    else:
        tmp = src
    if out_h == h and out_w == w:
        return src.copy()
    if out_h == h:
        return tmp
    out = np.empty((out_h, out_w, c), np.uint8)
    for yy in range(out_h):
        y0, n = bv[yy, 0], bv[yy, 1]
        for xx in range(out_w):
            for ch in range(c):
                ss = half
                for y in range(n):
                    ss += int(tmp[y0 + y, xx, ch]) * kv[yy, y]
                out[yy, xx, ch] = _clip8(ss)
    return out


@njit
def _is_diagonal(m: np.ndarray) -> bool:
    """A slot acting on each channel alone (brightness, contrast, the identity)."""
    for r in range(3):
        for c in range(3):
            if r != c and m[r, c] != 0.0:
                return False
    return True


@njit
def jitter_into(out: np.ndarray, img: np.ndarray, mats: np.ndarray) -> None:
    """The view's three jitter slots on uint8 (H, W, 3) `img` into `out` (the same array is
    allowed): mats (3, 3, 4) from views.jitter_matrices, each slot out = floor(clamp(M @ rgb + T,
    0, 255)) in float32, as Pillow's blend rounds. The slots that act per channel (brightness,
    contrast) become 256-entry tables, those before the saturation slot composed into one and
    those after it into another (exact: their inputs are the 256 uint8 levels), so a pixel
    costs table look-ups plus the one 3x3 map of saturation, a third of three full affine
    maps. Precondition: at most one slot mixes channels, as jitter_matrices makes them (only
    saturation does); a second one would replace the first."""
    lo, hi = np.float32(0.0), np.float32(255.0)
    m = mats.astype(np.float32)
    pre = np.empty((3, 256), np.uint8)  # the tables before and after the 3x3 map
    post = np.empty((3, 256), np.uint8)
    for ch in range(3):
        for v in range(256):
            pre[ch, v] = post[ch, v] = v
    q = np.zeros((3, 4), np.float32)  # the 3x3 map, the identity when no slot mixes channels
    for ch in range(3):
        q[ch, ch] = 1.0
    seen = False
    for s in range(3):
        if _is_diagonal(m[s]):
            t = post if seen else pre
            for ch in range(3):
                a, b = m[s, ch, ch], m[s, ch, 3]
                for v in range(256):
                    t[ch, v] = np.uint8(np.int32(min(max(a * np.float32(t[ch, v]) + b, lo), hi)))
        else:
            q, seen = m[s], True
    # the map's entries in locals: stores to `out` may alias arrays, locals cannot
    q00, q01, q02, q03 = q[0, 0], q[0, 1], q[0, 2], q[0, 3]
    q10, q11, q12, q13 = q[1, 0], q[1, 1], q[1, 2], q[1, 3]
    q20, q21, q22, q23 = q[2, 0], q[2, 1], q[2, 2], q[2, 3]
    h, w, _ = img.shape
    a = img.reshape(h * w, 3)
    o = out.reshape(h * w, 3)
    for p in range(h * w):
        fr, fg, fb = np.float32(pre[0, a[p, 0]]), np.float32(pre[1, a[p, 1]]), np.float32(pre[2, a[p, 2]])
        r = np.int32(min(max(q00 * fr + q01 * fg + q02 * fb + q03, lo), hi))
        g = np.int32(min(max(q10 * fr + q11 * fg + q12 * fb + q13, lo), hi))
        b = np.int32(min(max(q20 * fr + q21 * fg + q22 * fb + q23, lo), hi))
        o[p, 0], o[p, 1], o[p, 2] = post[0, r], post[1, g], post[2, b]
