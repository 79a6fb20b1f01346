"""The one sampler every loader backend follows: which cached images rank r reads, in order.

Epoch e visits the images in the order of a permutation seeded by (seed, e). Optimizer step s
of the epoch covers the global batch perm[s * G:(s + 1) * G], G = batch x world x accum;
micro-batch m of rank r takes its slice ((s * accum + m) * world + r) * batch. So one process
accumulating 2 x 8 sees exactly the images that 2 processes of 8 or one of 16 see at that
step, a batch is a pure function of (seed, epoch, step, rank, world size), and a resumed run
replays the same data. An epoch has len // G steps (the remainder is dropped, as the
reference's DistributedSampler with drop_last).

A rank's stream from optimizer step `start` on is one sequence of micro-batches across
epochs; `micro_batch(t)` and `sample(n)` index it (the DALI and FFCV backends ask for sample
n of the stream from worker processes).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


class StepSampler:
    def __init__(self, n_images: int, seed: int, batch: int, world: int = 1, rank: int = 0, accum: int = 1,
                 start_step: int = 0):
        self.n, self.seed, self.batch, self.world, self.rank, self.accum = n_images, seed, batch, world, rank, accum
        self.start_step = start_step
        self.steps_per_epoch = n_images // (batch * world * accum)  # optimizer steps
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's image order, drawn once per epoch (1.28M entries for ImageNet: about
        0.1 s), not once per micro-batch."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def batch_indices(self, epoch: int, step: int, micro: int = 0) -> np.ndarray:
        """Cache indices of rank r's micro-batch `micro` of optimizer step `step` in `epoch`."""
        start = ((step * self.accum + micro) * self.world + self.rank) * self.batch
        return self.permutation(epoch)[start:start + self.batch]

    def micro_batch(self, t: int) -> tuple[int, np.ndarray]:
        """(epoch, cache indices) of the t-th micro-batch of this rank's stream from start_step."""
        g = self.start_step * self.accum + t
        per_epoch = self.steps_per_epoch * self.accum
        epoch, k = divmod(g, per_epoch)
        return epoch, self.batch_indices(epoch, *divmod(k, self.accum))

    def sample(self, n: int) -> tuple[int, int]:
        """(epoch, cache index) of the n-th sample of this rank's stream from start_step."""
        t, pos = divmod(n, self.batch)
        epoch, idx = self.micro_batch(t)
        return epoch, int(idx[pos])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every sample of this rank in `epoch` (from start_step when it falls in it), in stream
        order: the micro-batches concatenated."""
        e0, s0 = divmod(self.start_step, self.steps_per_epoch)
        first = s0 if epoch == e0 else 0
        if epoch < e0:
            return np.zeros(0, np.int64)
        return np.concatenate([self.batch_indices(epoch, s, m) for s in range(first, self.steps_per_epoch)
                               for m in range(self.accum)] or [np.zeros(0, np.int64)])


class Counting(torch.utils.data.Sampler):
    """0, 1, 2, ...: a DataLoader over a stream dataset (sample n of a rank's StepSampler
    stream) reads it in order for as long as the trainer asks."""

    def __iter__(self):
        return itertools.count()
