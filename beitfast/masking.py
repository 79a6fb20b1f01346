"""BEiT blockwise masking: a Numba generator beside a plain-Python reference twin.

The algorithm is the reference one (REFERENCE.md section 2): repeatedly try to place a
rectangle of random area (at least `min_patches`) and log-uniform aspect ratio, 10 attempts
per rectangle, each side strictly smaller than the grid, accepting it only if it adds
between 1 and `remaining` new patches; stop when the budget is reached or a rectangle cannot
be placed (so a mask may end below the budget, never above). Modes: ``block`` (the paper),
``random`` (exactly N uniform patches, the paper's ablation); ``exact`` tops a block mask up
(or trims it) to exactly N with uniformly chosen patches (BEiT v2).

Reproducibility: every sample's mask is a pure function of (seed, epoch, sample index). A
counter-based RNG (splitmix64 keyed by a hash of the three) replaces the reference's global
`random` module, so masks do not depend on worker count, batch size, rank or world size.

Entry points:
- `MaskGenerator(spec, seed)(indices, epoch)` -> bool (B, h, w), Numba, parallel over B;
- `reference_mask(spec, rng)`: the twin, plain Python, taking either `CounterRng` (same
  stream as the Numba code: identical masks) or `random.Random` (the reference's RNG);
- `MaskGenerator(spec, seed, parallel=False)`: the same masks in the calling thread only
  (the DALI backend's external source, whose thread must not share Numba's parallel pool
  with the trainer's); `ffcv_mask_op`: the generator as an FFCV pipeline operation.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

from beitfast.jit import njit, prange

ATTEMPTS = 10  # tries per block, as in the reference

# splitmix64 constants (Steele, Lea & Flood 2014)
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_KEY_EPOCH = 0xD1B54A32D192ED03
_KEY_INDEX = 0x8CB92BA72F3D8DD7
_U53 = 1.0 / (1 << 53)


@dataclass(frozen=True)
class MaskSpec:
    """What a mask looks like. `max_patches=None` means the budget; `max_aspect=None`
    means 1/min_aspect."""

    height: int = 14
    width: int = 14
    num_patches: int = 75
    min_patches: int = 16
    max_patches: Optional[int] = None
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None
    mode: str = "block"
    exact: bool = False

    def __post_init__(self):
        n = self.height * self.width
        if not (1 <= self.height and 1 <= self.width <= 64):
            raise ValueError(f"mask grid must be 1..64 patches wide and at least 1 high, got {self.height}x{self.width}")
        if not 0 <= self.num_patches <= n:
            raise ValueError(f"mask num_patches={self.num_patches} must be in 0..{n} for a {self.height}x{self.width} grid")
        if self.mode not in ("block", "random"):
            raise ValueError(f"mask mode must be 'block' or 'random', got {self.mode!r}")
        if self.min_patches < 1:
            raise ValueError(f"mask min_patches must be >= 1, got {self.min_patches}")
        if self.min_aspect <= 0 or (self.max_aspect is not None and self.max_aspect < self.min_aspect):
            raise ValueError(f"mask aspect range ({self.min_aspect}, {self.max_aspect}) is not a valid range")

    @property
    def max_block(self) -> int:
        return self.num_patches if self.max_patches is None else self.max_patches

    @property
    def log_aspect(self) -> tuple[float, float]:
        hi = self.max_aspect if self.max_aspect is not None else 1.0 / self.min_aspect
        return math.log(self.min_aspect), math.log(hi)

    @classmethod
    def from_config(cls, mask_cfg, grid: int | tuple[int, int]) -> "MaskSpec":
        h, w = (grid, grid) if isinstance(grid, int) else grid
        return cls(height=h, width=w, num_patches=mask_cfg.num_patches, min_patches=mask_cfg.min_patches,
                   max_patches=mask_cfg.max_patches, min_aspect=mask_cfg.min_aspect,
                   max_aspect=mask_cfg.max_aspect, mode=mask_cfg.mode, exact=mask_cfg.exact)


# =========================================================================== reference
def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The 64-bit RNG state of one sample: a hash of (seed, epoch, index)."""
    k = _mix64((seed + _GOLDEN) & _MASK64)
    k = _mix64(k ^ ((epoch * _KEY_EPOCH) & _MASK64))
    return _mix64(k ^ ((index * _KEY_INDEX) & _MASK64))


class CounterRng:
    """splitmix64 stream from a sample key; the Numba code draws the identical stream.
    Offers the subset of `random.Random` that `reference_mask` uses."""

    def __init__(self, seed: int, epoch: int, index: int):
        self.state = sample_key(seed, epoch, index)

    def random(self) -> float:
        self.state = (self.state + _GOLDEN) & _MASK64
        return (_mix64(self.state) >> 11) * _U53

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        """Uniform integer in [a, b], inclusive like random.randint."""
        return a + int(self.random() * (b - a + 1))


def reference_mask(spec: MaskSpec, rng, stats: dict | None = None) -> np.ndarray:
    """One (h, w) bool mask, written as plainly as the reference; `rng` is a CounterRng
    (masks identical to the Numba generator) or a `random.Random`. If `stats` is a dict,
    `stats["blocks"]` receives the number of rectangles placed."""
    h, w = spec.height, spec.width
    mask = np.zeros((h, w), dtype=bool)
    if spec.mode == "random":
        _reference_fill(mask, spec.num_patches, rng, want=True)
        return mask
    lo, hi = spec.log_aspect
    count = blocks = 0
    while count < spec.num_patches:
        remaining = min(spec.num_patches - count, spec.max_block)
        added = 0
        for _ in range(ATTEMPTS):
            target = rng.uniform(spec.min_patches, remaining)
            aspect = math.exp(rng.uniform(lo, hi))
            bh = int(round(math.sqrt(target * aspect)))
            bw = int(round(math.sqrt(target / aspect)))
            if bw < w and bh < h:
                top = rng.randint(0, h - bh)
                left = rng.randint(0, w - bw)
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= remaining:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
        blocks += 1
    if stats is not None:
        stats["blocks"] = blocks
    if spec.exact and count != spec.num_patches:
        if count < spec.num_patches:
            _reference_fill(mask, spec.num_patches - count, rng, want=True)
        else:
            _reference_fill(mask, count - spec.num_patches, rng, want=False)
    return mask


def _reference_fill(mask: np.ndarray, n: int, rng, want: bool) -> None:
    """Flip `n` uniformly chosen cells whose value is `not want` to `want` (partial
    Fisher-Yates over those cells in row-major order)."""
    flat = mask.reshape(-1)
    cand = [i for i in range(flat.size) if flat[i] != want]
    for i in range(n):
        j = i + rng.randint(0, len(cand) - 1 - i)
        cand[i], cand[j] = cand[j], cand[i]
        flat[cand[i]] = want


def reference_masks(spec: MaskSpec, seed: int, epoch: int, indices) -> np.ndarray:
    """(B, h, w) masks from the twin; identical to `MaskGenerator(spec, seed)(indices, epoch)`."""
    return np.stack([reference_mask(spec, CounterRng(seed, epoch, int(i))) for i in indices])


# =========================================================================== numba
_G = np.uint64(_GOLDEN)
_N1 = np.uint64(_M1)
_N2 = np.uint64(_M2)
_NKE = np.uint64(_KEY_EPOCH)
_NKI = np.uint64(_KEY_INDEX)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(inline="always")
def _nb_mix64(z):
    z = (z ^ (z >> _S30)) * _N1
    z = (z ^ (z >> _S27)) * _N2
    return z ^ (z >> _S31)


@njit
def _nb_key(seed, epoch, index):
    k = _nb_mix64(np.uint64(seed) + _G)
    k = _nb_mix64(k ^ (np.uint64(epoch) * _NKE))
    return _nb_mix64(k ^ (np.uint64(index) * _NKI))


@njit(inline="always")
def _nb_random(state):
    """(new state, uniform float in [0, 1)) from a splitmix64 step."""
    state = state + _G
    return state, np.float64(_nb_mix64(state) >> _S11) * _U53


@njit
def _nb_fill(m, n, state, want, cand):
    """Set `n` uniformly chosen cells of flat mask `m` that differ from `want` to `want`."""
    k = 0
    for i in range(m.size):
        if m[i] != want:
            cand[k] = i
            k += 1
    for i in range(n):
        state, u = _nb_random(state)
        j = i + np.int64(u * (k - i))
        t = cand[i]
        cand[i] = cand[j]
        cand[j] = t
        m[cand[i]] = want
    return state


_U1 = np.uint64(1)
_P1, _P2, _P4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_P8, _S1, _S2, _S4, _S56 = np.uint64(0x0101010101010101), np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(56)


@njit(inline="always")
def _popcount(x):
    x = x - ((x >> _S1) & _P1)
    x = (x & _P2) + ((x >> _S2) & _P2)
    x = (x + (x >> _S4)) & _P4
    return np.int64((x * _P8) >> _S56)


@njit
def _nb_mask_one(m, h, w, state, budget, min_p, max_block, log_lo, log_hi, mode_random, exact, cand, rows):
    """Fill flat mask `m` (h*w bools, all False on entry) for one sample; returns count.
    The block phase keeps one uint64 bitmask per row (`rows`, length h; grids up to 64
    wide), so a rectangle costs a popcount per row instead of a test per cell."""
    if mode_random:
        _nb_fill(m, budget, state, True, cand)
        return budget
    rows[:] = 0
    count = 0
    while count < budget:
        remaining = min(budget - count, max_block)
        added = 0
        for _ in range(ATTEMPTS):
            state, u = _nb_random(state)
            target = min_p + (remaining - min_p) * u
            state, u = _nb_random(state)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u)
            bh = np.int64(np.rint(math.sqrt(target * aspect)))  # half-to-even, like round()
            bw = np.int64(np.rint(math.sqrt(target / aspect)))
            if bw < w and bh < h:
                state, u = _nb_random(state)
                top = np.int64(u * (h - bh + 1))
                state, u = _nb_random(state)
                left = np.int64(u * (w - bw + 1))
                span = ((_U1 << np.uint64(bw)) - _U1) << np.uint64(left)
                new = bh * bw
                for i in range(top, top + bh):
                    new -= _popcount(rows[i] & span)
                if 0 < new <= remaining:
                    for i in range(top, top + bh):
                        rows[i] |= span
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    for i in range(h):
        r = rows[i]
        for j in range(w):
            m[i * w + j] = (r >> np.uint64(j)) & _U1
    if exact and count != budget:
        if count < budget:
            _nb_fill(m, budget - count, state, True, cand)
        else:
            _nb_fill(m, count - budget, state, False, cand)
        count = budget
    return count


_CHUNK = 64  # samples per parallel task: amortises the scratch allocation


@njit(parallel=True)
def _nb_masks(out, seed, epoch, indices, budget, min_p, max_block, log_lo, log_hi, mode_random, exact):
    """out: (B, h, w) bool, overwritten; one mask per entry of `indices` (B,)."""
    b, h, w = out.shape
    flat = out.reshape(b, h * w)
    flat[:] = False
    for c in prange((b + _CHUNK - 1) // _CHUNK):
        cand = np.empty(h * w, np.int64)  # scratch for the random / exact modes
        rows = np.empty(h, np.uint64)  # scratch for the block phase
        for s in range(c * _CHUNK, min(b, (c + 1) * _CHUNK)):
            _nb_mask_one(flat[s], h, w, _nb_key(seed, epoch, indices[s]), budget, min_p, max_block,
                         log_lo, log_hi, mode_random, exact, cand, rows)


@njit
def _nb_masks_serial(out, seed, epoch, indices, budget, min_p, max_block, log_lo, log_hi, mode_random, exact):
    """_nb_masks in the calling thread (no parallel pool): the same masks."""
    b, h, w = out.shape
    flat = out.reshape(b, h * w)
    flat[:] = False
    cand = np.empty(h * w, np.int64)
    rows = np.empty(h, np.uint64)
    for s in range(b):
        _nb_mask_one(flat[s], h, w, _nb_key(seed, epoch, indices[s]), budget, min_p, max_block,
                     log_lo, log_hi, mode_random, exact, cand, rows)


class MaskGenerator:
    """Batched masks from `spec`: `gen(indices, epoch)` -> bool (B, h, w), each mask a pure
    function of (seed, epoch, index); parallel over the batch in Numba's thread pool, or in
    the calling thread alone (parallel=False)."""

    def __init__(self, spec: MaskSpec, seed: int = 0, parallel: bool = True):
        self.spec = spec
        self.seed = int(seed)
        self.parallel = parallel

    def _args(self):
        s = self.spec
        lo, hi = s.log_aspect
        return (s.num_patches, float(s.min_patches), s.max_block, lo, hi, s.mode == "random", s.exact)

    def __call__(self, indices, epoch: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((idx.size, self.spec.height, self.spec.width), dtype=bool)
        elif (out.shape != (idx.size, self.spec.height, self.spec.width) or out.dtype != np.bool_
              or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous bool {(idx.size, self.spec.height, self.spec.width)}, got {out.dtype} {out.shape}")
        with np.errstate(over="ignore"):  # uint64 wrap-around is the hash; matters with JIT off
            (_nb_masks if self.parallel else _nb_masks_serial)(out, self.seed, int(epoch), idx, *self._args())
        return out


def python_random_masks(spec: MaskSpec, n: int, seed: int = 0) -> np.ndarray:
    """`n` masks from the reference algorithm driven by Python's `random` (the reference
    code's RNG): an independent stream to compare distributions against."""
    rng = random.Random(seed)
    return np.stack([reference_mask(spec, rng) for _ in range(n)])


# =========================================================================== loaders
def ffcv_mask_op(spec: MaskSpec, seed: int = 0):
    """An FFCV pipeline operation that ignores its input and returns the (B, h, w) bool masks
    of the batch's sample indices at the operation's current `epoch` attribute (set it
    before each epoch). Runs outside FFCV's JIT block so the epoch is read at run time;
    the work itself is the compiled batched generator."""
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    gen = MaskGenerator(spec, seed)

    class FFCVMaskOp(Operation):
        epoch = 0

        def generate_code(self):
            op = self

            def make_masks(inp, dst, indices):
                return gen(indices, op.epoch, out=dst[: len(indices)])

            make_masks.with_indices = True
            return make_masks

        def declare_state_and_memory(self, previous_state):
            shape = (spec.height, spec.width)
            return (replace(previous_state, jit_mode=False, shape=shape, dtype=np.dtype(bool)),
                    AllocationQuery(shape, np.dtype(bool)))

    return FFCVMaskOp()
