"""Masked-image-modeling accuracy on fixed views: the memorisation probe of a pretraining run.

`log.mim_eval` names token caches of the same images as `name:DIR` pairs, comma-separated,
for example `cached:runs/k4/cache,fresh:runs/heldout_cache`. Every `log.mim_eval_every_epochs`
the trainer scores the model (eval mode, no gradients, its random streams untouched) on view 0
of the first `log.mim_eval_images` images of each cache, with one fixed set of masks shared by
all of them, and appends a row per evaluation to `<out>/mim_eval.jsonl`:

    {"step": 1500, "epoch": 100, "cached": 0.4123, "fresh": 0.3311}

With the training cache under one name and a cache of views drawn from another seed (views the
model never trains on) under the other, the gap between the two is what the model has learnt
about its cached targets that does not carry over to a new view of the same image: the cost of
replaying K views. The views are rendered once, at start, by the reference renderer (Pillow),
whatever the training backend.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from beitfast.data.cache import CacheError, TokenCache

EVAL_MASK_SEED = 20_231_104  # one set of masks for every cache and evaluation, apart from training's


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """'name:DIR,name:DIR' -> [(name, DIR)]; a ConfigError-worthy ValueError names the bad part."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = part.partition(":")
        if not sep or not name or not path:
            raise ValueError(f"log.mim_eval: {part!r} is not name:DIR (for example cached:runs/cache)")
        if name in {n for n, _ in pairs} or name in ("step", "epoch"):
            raise ValueError(f"log.mim_eval: the name {name!r} is repeated or reserved")
        pairs.append((name, path))
    return pairs


class MimProbe:
    """The fixed evaluation sets; `probe(model)` returns {name: MIM accuracy}."""

    def __init__(self, cfg, device: torch.device, batch: int = 128):
        from PIL import Image
        import torchvision.transforms.functional as TF

        from beitfast.data.render import render_args
        from beitfast.data.views import reference_view
        from beitfast.masking import MaskGenerator, MaskSpec

        args = render_args(cfg, "vit")
        grid = cfg.model.img_size // cfg.model.patch_size
        self.device, self.batch, self.budget = device, batch, cfg.mask.num_patches
        self.sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        first_blobs, n = None, None
        for name, path in parse_spec(cfg.log.mim_eval):
            cache = TokenCache(path)
            n = min(cfg.log.mim_eval_images, len(cache)) if n is None else min(n, len(cache))
            imgs, toks, blobs = [], [], []
            for j in range(n):
                data, _, views, tokens = cache.item(j)
                if np.asarray(tokens[0]).size != grid * grid:
                    raise CacheError(f"log.mim_eval: {path} holds {np.asarray(tokens[0]).size} tokens a view, the "
                                     f"model's grid is {grid}x{grid}")
                blobs.append(data.tobytes())
                img = reference_view(Image.open(io.BytesIO(blobs[-1])).convert("RGB"), views[0], args["size"],
                                     args["interp"])
                imgs.append(TF.normalize(TF.to_tensor(img), *args["normalize"]))
                toks.append(torch.from_numpy(np.asarray(tokens[0], np.int64)).view(grid, grid))
            if first_blobs is None:
                first_blobs = blobs
            elif any(a != b for a, b in zip(first_blobs, blobs)):
                j = next(i for i, (a, b) in enumerate(zip(first_blobs, blobs)) if a != b)
                raise CacheError(f"log.mim_eval: {path} image {j} ({cache.locate(j)}) is not the same image as in the "
                                 f"first cache named: the caches must be made from the same data in the same order")
            self.sets[name] = (torch.stack(imgs), torch.stack(toks))
        n = min(len(v[0]) for v in self.sets.values())
        self.sets = {k: (x[:n], t[:n]) for k, (x, t) in self.sets.items()}
        self.masks = torch.from_numpy(MaskGenerator(MaskSpec.from_config(cfg.mask, grid), EVAL_MASK_SEED)(
            np.arange(n), 0)).reshape(n, -1)
        self.n = n

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        out = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for name, (x, t) in self.sets.items():
                correct = masked = 0
                for i in range(0, self.n, self.batch):
                    o = model(x[i:i + self.batch].to(self.device), self.masks[i:i + self.batch].to(self.device),
                              t[i:i + self.batch].to(self.device), self.budget)
                    correct += int(o["correct"])
                    masked += int(o["n_masked"])
                out[name] = round(correct / max(1, masked), 5)
        model.train(was)
        return out


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
