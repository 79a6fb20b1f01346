"""The reference backend (`data.backend: reference`): a torch DataLoader whose worker
processes render each stored view with Pillow and torchvision, the way the original code
loads (ColorJitter on the whole PIL image, horizontal flip, crop box resized bicubic 224 /
Lanczos 112, ToTensor + Normalize, in float32). It is the correctness oracle the other
backends are compared with, and the speed baseline. With `data.targets: online` the same
DataLoader reads the image folder instead and the tokenizer makes the targets every step
(`OnlineLoader`): the original recipe whole, the baseline of benchmarks/bench_train.py.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from beitfast.data.cache import TokenCache
from beitfast.data.render import image_dtype, render_args
from beitfast.data.sampler import Counting, StepSampler
from beitfast.data.views import pick_view, reference_view
from beitfast.masking import MaskGenerator, MaskSpec
from beitfast.preempt import ignore_in_worker


class StreamDataset(torch.utils.data.Dataset):
    """Sample n of the rank's stream -> (image, tokens, mask, index); opens the memory-mapped
    cache lazily in each worker process."""

    def __init__(self, cache_path: str, sampler: StepSampler, seed: int, spec: MaskSpec, mask_seed: int, size: int,
                 interp: str, normalize):
        self.cache_path, self.sampler, self.seed = str(cache_path), sampler, seed
        self.spec, self.mask_seed, self.size, self.interp, self.normalize = spec, mask_seed, size, interp, normalize
        self._cache = self._masks = None

    def __getitem__(self, n: int):
        import torchvision.transforms.functional as TF
        from PIL import Image

        if self._cache is None:
            self._cache = TokenCache(self.cache_path)
            self._masks = MaskGenerator(self.spec, self.mask_seed)
        epoch, j = self.sampler.sample(n)
        data, _, views, tokens = self._cache.item(j)
        v = int(pick_view(self.seed, epoch, j, self._cache.views_per_image))
        img = reference_view(Image.open(io.BytesIO(data.tobytes())).convert("RGB"), views[v], self.size, self.interp)
        if self.normalize is None:
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # uint8, the tokenizer's input
        else:
            x = TF.normalize(TF.to_tensor(img), *self.normalize)
        mask = self._masks(np.array([j]), epoch)[0]
        return x, torch.from_numpy(np.asarray(tokens[v], np.int64)), torch.from_numpy(mask), j

    def __len__(self):  # the stream has no end; the sampler below decides how far it is read
        return 1 << 62


class ReferenceLoader:
    def __init__(self, cache: TokenCache, cfg, sampler: StepSampler, device: torch.device, workers: int,
                 view: str = "vit"):
        self.cache, self.cfg, self.sampler, self.device, self.workers, self.view = cache, cfg, sampler, device, \
            workers, view
        self.grid = cfg.model.img_size // cfg.model.patch_size
        self._it = None

    def _dataset(self):
        return StreamDataset(self.cache.path, self.sampler, self.cfg.train.seed,
                             MaskSpec.from_config(self.cfg.mask, self.grid), self.cfg.mask.seed,
                             **render_args(self.cfg, self.view))

    def _batch(self, x, tokens, mask, index):
        return {"images": x.to(self.device, self._dtype, non_blocking=True),
                "tokens": tokens.view(-1, self.grid, self.grid).to(self.device, non_blocking=True),
                "mask": mask.to(self.device, non_blocking=True), "index": index.long()}

    def stream(self, start_step: int = 0):
        self.sampler.start_step = start_step
        cuda = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(self._dataset(), batch_size=self.sampler.batch, sampler=Counting(),
                                         num_workers=self.workers, pin_memory=cuda, worker_init_fn=ignore_in_worker,
                                         prefetch_factor=max(2, self.cfg.data.prefetch) if self.workers else None)
        self._dtype = image_dtype(self.cfg) if self.view == "vit" else torch.uint8
        self._it = iter(dl)
        try:
            for batch in self._it:
                yield self._batch(*batch)
        finally:
            self.close()

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


# ----------------------------------------------------------------------------- online targets
class OnlineDataset(torch.utils.data.Dataset):
    """`data.targets: online`, the original recipe: sample n of the rank's stream -> (ViT view,
    tokenizer view, mask, index), read straight from the image folder. Image j in epoch e uses
    view e of `sample_views(seed, j, ...)` (a fresh view every epoch), rendered as the reference
    renders it: one jitter and crop, resized twice (bicubic for the ViT, Lanczos for the
    tokenizer, which runs on the training device in the loader's stream). A file that cannot
    be decoded is named on stderr once and replaced by the next decodable file in the listing
    (a pure function of the index, so resumed runs stay identical); the original code would
    stop on it."""

    def __init__(self, root: str, files: list[str], sampler: StepSampler, seed: int, aug, spec: MaskSpec,
                 mask_seed: int, size: int, normalize, tok_size: int):
        self.root, self.files, self.sampler, self.seed, self.aug = root, files, sampler, seed, aug
        self.spec, self.mask_seed, self.size, self.normalize, self.tok_size = spec, mask_seed, size, normalize, tok_size
        self._masks, self._bad = None, set()

    def __getitem__(self, n: int):
        import torchvision.transforms.functional as TF
        from PIL import Image

        from beitfast.data.images import read_decodable
        from beitfast.data.views import reference_views, sample_views

        if self._masks is None:
            self._masks = MaskGenerator(self.spec, self.mask_seed)
        epoch, j = self.sampler.sample(n)
        arr, _ = read_decodable(self.root, self.files, j, self._bad, "online")  # upright RGB, whatever the mode
        h, w = arr.shape[:2]
        view = sample_views(self.seed, j, h, w, 1, self.aug, first=epoch)[0]
        vit, tok = reference_views(Image.fromarray(arr), view, [(self.size, "cubic"), (self.tok_size, "lanczos")])
        x = TF.normalize(TF.to_tensor(vit), *self.normalize)
        mask = self._masks(np.array([j]), epoch)[0]
        return x, torch.from_numpy(np.array(tok)).permute(2, 0, 1), torch.from_numpy(mask), j

    def __len__(self):
        return 1 << 62


class OnlineLoader(ReferenceLoader):
    """The batch contract with targets made on the fly: the tokenizer (`tokenizer.*`, in
    `tokenizer.precision`) encodes each batch's tokenizer view on the training device, every
    step, as the original method does. view="tokenizer" yields the tokenizer's uint8 input."""

    def __init__(self, files: list[str], cfg, sampler: StepSampler, device: torch.device, workers: int,
                 view: str = "vit", tokenizer=None):
        super().__init__(None, cfg, sampler, device, workers, view)
        from beitfast.tokenizers import build_tokenizer

        self.files = files
        self.tokenizer = tokenizer or build_tokenizer(cfg.tokenizer, cfg.data.tokenizer_img_size, device)

    def _dataset(self):
        from beitfast.data.views import AugSpec

        args = render_args(self.cfg, "vit")
        return OnlineDataset(self.cfg.data.root, self.files, self.sampler,
                             self.cfg.train.seed, AugSpec.from_config(self.cfg.data),
                             MaskSpec.from_config(self.cfg.mask, self.grid), self.cfg.mask.seed, args["size"],
                             args["normalize"], self.cfg.data.tokenizer_img_size)

    def _batch(self, x, tok, mask, index):
        tok = tok.to(self.device, non_blocking=True)
        tokens = self.tokenizer.encode(tok)
        if self.view == "tokenizer":
            x = tok
        return {"images": x.to(self.device, self._dtype, non_blocking=True), "tokens": tokens,
                "mask": mask.to(self.device, non_blocking=True), "index": index.long()}
