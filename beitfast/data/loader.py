"""Training batches from a token cache: the one batch contract, and the backend that makes it.

Every backend (`data.backend`) yields the same micro-batches, so the training loop never
branches on the backend:

    images  (B, 3, S, S) normalised with data.mean / data.std, on the device: fp16 when the
            run trains in bf16 or fp16 (autocast reads it; fp16 holds normalised pixels more
            precisely than bf16), fp32 otherwise. With view="tokenizer": uint8 (B, 3, T, T),
            the tokenizer's input, not normalised (to check a backend against the cache).
    tokens  long (B, h, w), the cached tokens of exactly the rendered view, on the device
    mask    bool (B, h, w), blockwise masks of (mask.seed, epoch, index), on the device
    index   long (B,), cache indices of the images, on the CPU

Image j in epoch e is rendered from cached view `pick_view(seed, e, j, K)`; which images a
rank reads, in which order, is `StepSampler`'s business (one sampler for every backend).
A batch's tensors may live in buffers the backend reuses a few batches later (FFCV's and
DALI's queues): use a batch before asking for the next few, or clone what you keep.

    dali       one pipelined DALI graph per rank (beitfast/data/dali_loader.py): the default
    reference  a torch DataLoader whose workers render with Pillow and torchvision, as the
               original code loads (beitfast/data/reference_loader.py): the correctness
               oracle and the speed baseline
    ffcv       FFCV's compiled pipeline over a .beton written by data_prep/cache_to_ffcv.py
               (beitfast/data/ffcv_loader.py)

Threads: `data.num_threads` (0: this node's cores divided among its ranks) is what each rank
gives DALI, FFCV, Numba and torch; `data.workers` (-1: the same share) the Python worker
processes that read the cache (DALI's parallel external source, the DataLoader's workers).
"""
from __future__ import annotations

import os

import torch

from beitfast.data.cache import CacheError, TokenCache
from beitfast.data.sampler import StepSampler

BACKENDS = ("dali", "reference", "ffcv")


def resolve_backend(data_cfg) -> str:
    """data.backend: auto is dali over a token cache and reference with data.targets=online
    (the only backend that renders images and tokenizes them on the fly); an explicit choice
    stays as it is (build_loader refuses an explicit dali or ffcv with online targets)."""
    if data_cfg.backend != "auto":
        return data_cfg.backend
    return "reference" if data_cfg.targets == "online" else "dali"


def thread_plan(data_cfg, local_world: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(threads, workers) per rank: an explicit data.num_threads / data.workers, or this node's
    cores divided among the ranks on it (LOCAL_WORLD_SIZE under torchrun), never multiplied."""
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = cores or len(os.sched_getaffinity(0))
    share = max(1, cores // local_world)
    threads = data_cfg.num_threads or share
    workers = share if data_cfg.workers < 0 else data_cfg.workers
    return threads, workers


def _sampler(cfg, n: int, where, world: int, rank: int, accum: int, error) -> StepSampler:
    """The rank's StepSampler over n images; `error` (naming `where`) when they are fewer
    than one global batch."""
    sampler = StepSampler(n, cfg.train.seed, cfg.data.batch_size, world, rank, accum)
    if sampler.steps_per_epoch == 0:
        raise error(f"{where}: {n} images are fewer than one global batch "
                    f"({cfg.data.batch_size} x {world} ranks x {accum} accumulation steps)")
    return sampler


def build_loader(cfg, cache: TokenCache | None, rank: int = 0, world: int = 1, device="cpu", accum: int = 1,
                 view: str = "vit", threads: int | None = None, workers: int | None = None, tokenizer=None):
    """The configured backend over `cache`, for rank `rank` of `world` accumulating `accum`
    micro-batches a step. Returns an object with `steps_per_epoch`, `stream(start_step)` (the
    micro-batches from that optimizer step on, across epochs) and `close()`. With
    `data.targets: online` there is no cache (pass None): the images are read from
    `data.root` and `tokenizer` (built from `tokenizer.*` when None) makes the targets."""
    device = torch.device(device)
    plan = thread_plan(cfg.data)
    threads = threads if threads is not None else plan[0]
    workers = workers if workers is not None else plan[1]
    if cfg.data.targets == "online":
        return _online_loader(cfg, rank, world, device, accum, view, workers, tokenizer)
    cache.check_config(cfg)  # settings, vocabulary, grid (the trainer also checks the tokenizer)
    sampler = _sampler(cfg, len(cache), cache.path, world, rank, accum, CacheError)
    backend = resolve_backend(cfg.data)
    if backend == "dali":
        from beitfast.data.dali_loader import DaliLoader

        loader = DaliLoader(cache, cfg, sampler, device, threads, workers, view)
    elif backend == "reference":
        from beitfast.data.reference_loader import ReferenceLoader

        loader = ReferenceLoader(cache, cfg, sampler, device, workers, view)
    elif backend == "ffcv":
        from beitfast.data.ffcv_loader import FfcvLoader

        loader = FfcvLoader(cache, cfg, sampler, device, threads, view)
    else:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
    loader.steps_per_epoch = sampler.steps_per_epoch
    return loader


def _online_loader(cfg, rank, world, device, accum, view, workers, tokenizer):
    """`data.targets: online`: the reference loader over the image folder, tokenizing each
    batch on `device` (the original recipe). Only the reference backend renders online."""
    from beitfast.data.images import list_imagefolder
    from beitfast.data.reference_loader import OnlineLoader

    if resolve_backend(cfg.data) != "reference":
        raise ValueError(f"data.targets=online renders with the reference backend (Pillow workers, as the original "
                         f"code); data.backend={cfg.data.backend} reads a token cache: set data.backend=reference "
                         f"or data.targets=cache")
    files, _, _ = list_imagefolder(cfg.data.root, cfg.data.split)
    sampler = _sampler(cfg, len(files), cfg.data.root, world, rank, accum, ValueError)
    loader = OnlineLoader(files, cfg, sampler, device, workers, view, tokenizer)
    grid = cfg.model.img_size // cfg.model.patch_size
    tok = loader.tokenizer
    if tuple(tok.grid) != (grid, grid) or tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer.path}: grid {tok.grid}, vocabulary {tok.vocab_size}; the model "
                         f"predicts {grid}x{grid} tokens of model.vocab_size={cfg.model.vocab_size}")
    loader.steps_per_epoch = sampler.steps_per_epoch
    return loader
