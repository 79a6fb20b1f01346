"""Training batches from a token cache: the reference loader backend.

The batch contract every backend yields (the training loop never branches on the backend):
    images  float (B, 3, S, S), normalised with data.mean / data.std, on the device
    tokens  long  (B, h, w), the cached tokens of exactly the rendered view
    mask    bool  (B, h, w), blockwise masks (seed, epoch, index)
    index   long  (B,), source indices (for debugging and resume checks)

Each epoch, image j uses cached view `pick_view(seed, epoch, j, K)`, rendered at the model's
size (bicubic, antialiased) by the shared view code; batches are slices of a permutation
seeded by (seed, epoch), split across ranks, so a batch is a pure function of (seed, epoch,
step, rank, world size) and a resumed run replays the same data.

Gradient accumulation (`accum` micro-batches per optimizer step): step s of an epoch covers
the global batch perm[s * G:(s + 1) * G], G = batch x world x accum, micro-batch m of rank r
taking its slice ((s * accum + m) * world + r) * batch, so one process accumulating 2 x 8
sees exactly the images that 2 processes of 8 or one of 16 see at that step.
"""
from __future__ import annotations

import numpy as np
import torch

from beitfast.data.cache import CacheError, TokenCache
from beitfast.data.views import VIEW_DTYPE, ViewRenderer, pick_view
from beitfast.masking import MaskGenerator, MaskSpec


def one_line(err: Exception, limit: int = 400) -> str:
    """An exception's message on one line (DALI's span many, with a pipeline traceback)."""
    text = " ".join(x.strip() for x in str(err).splitlines() if x.strip())
    return text if len(text) <= limit else text[:limit] + "..."


class CachedViewLoader:
    def __init__(self, cache: TokenCache, cfg, rank: int = 0, world: int = 1, device="cpu", accum: int = 1):
        self.cache, self.cfg, self.rank, self.world, self.accum = cache, cfg, rank, world, accum
        self.device = torch.device(device)
        self.batch = cfg.data.batch_size
        self.seed = cfg.train.seed
        cache.check_config(cfg)  # settings, vocabulary, grid (the trainer also checks the tokenizer)
        grid = cfg.model.img_size // cfg.model.patch_size
        self.grid = grid
        self.masks = MaskGenerator(MaskSpec.from_config(cfg.mask, grid), seed=cfg.mask.seed)
        self.renderer = ViewRenderer(cfg.model.img_size, "cubic", self.batch,
                                     "gpu" if self.device.type == "cuda" else "cpu", cfg.data.num_threads,
                                     self.device.index or 0)
        self.mean = torch.tensor(cfg.data.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg.data.std, device=self.device).view(1, 3, 1, 1) * 255
        self._perm_epoch, self._perm = None, None  # the last epoch's image order (see _permutation)
        self.steps_per_epoch = len(cache) // (self.batch * world * accum)  # optimizer steps
        if self.steps_per_epoch == 0:
            raise CacheError(f"{cache.path}: {len(cache)} images are fewer than one global batch "
                             f"({self.batch} x {world} ranks x {accum} accumulation steps)")

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's image order, made once per epoch (1.28M entries for ImageNet), not
        once per micro-batch."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.cache))
            self._perm_epoch = epoch
        return self._perm

    def batch_indices(self, epoch: int, step: int, micro: int = 0) -> np.ndarray:
        start = ((step * self.accum + micro) * self.world + self.rank) * self.batch
        return self._permutation(epoch)[start:start + self.batch]

    def _render_error(self, idx, jpegs, err: Exception) -> str:
        from beitfast.data.images import BadImage, decode_rgb

        bad = []
        for j, data in zip(idx, jpegs):
            try:
                decode_rgb(bytes(data))
            except BadImage:
                bad.append(int(j))
        dali = one_line(err)
        if bad:
            where = "; ".join(f"image {j} ({self.cache.locate(j)})" for j in bad[:5])
            return (f"{self.cache.path}: {len(bad)} cached image(s) of this batch cannot be decoded: {where}. The cache "
                    f"is damaged: check it with data_prep/verify_cache.py and rebuild it (DALI: {dali})")
        return f"{self.cache.path}: rendering the views of images {idx[:8].tolist()}... failed: {dali}"

    def stream(self, start_step: int = 0):
        """Micro-batches from global optimizer step `start_step` on, across epochs, without end:
        `accum` per step (the training loop takes what it needs)."""
        epoch = start_step // self.steps_per_epoch
        yield from self.epoch(epoch, start_step % self.steps_per_epoch)
        while True:
            epoch += 1
            yield from self.epoch(epoch)

    def close(self) -> None:
        """Release the DALI pipeline (its threads) now rather than at interpreter exit."""
        self.renderer = None

    def epoch(self, epoch: int, start_step: int = 0):
        """Micro-batches of `epoch` from optimizer step `start_step` on, `accum` per step, in
        order (the contract in the module docstring)."""
        k = self.cache.views_per_image
        for step in range(start_step * self.accum, self.steps_per_epoch * self.accum):
            idx = self.batch_indices(epoch, *divmod(step, self.accum))
            which = pick_view(self.seed, epoch, idx, k)
            items = [self.cache.item(int(j)) for j in idx]
            jpegs = [np.asarray(it[0]) for it in items]
            views = np.array([it[2][v] for it, v in zip(items, which)], VIEW_DTYPE)
            tokens = np.stack([it[3][v] for it, v in zip(items, which)]).astype(np.int64)
            try:
                images = self.renderer.render(jpegs, views)
            except RuntimeError as e:  # DALI names neither the image nor the file: find them
                raise CacheError(self._render_error(idx, jpegs, e)) from e
            images = (images.to(self.device) - self.mean) / self.std
            yield {"images": images,
                   "tokens": torch.from_numpy(tokens).view(-1, self.grid, self.grid).to(self.device),
                   "mask": torch.from_numpy(self.masks(idx, epoch)).to(self.device),
                   "index": torch.from_numpy(idx.astype(np.int64))}
