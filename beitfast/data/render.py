"""What every loader backend (beitfast/data/{dali,reference,ffcv}_loader.py) renders and how
it names a failure: the view's size, resampler and normalisation, the image dtype, and the
rendering errors that name the damaged cached images. loader.py builds the backends; they
import this module, never loader.py, so imports in beitfast/data/ flow one way.
"""
from __future__ import annotations

import torch

from beitfast.data.cache import CacheError, TokenCache


def one_line(err: Exception, limit: int = 400) -> str:
    """An exception's message on one line (DALI's span many, with a pipeline traceback)."""
    text = " ".join(x.strip() for x in str(err).splitlines() if x.strip())
    return text if len(text) <= limit else text[:limit] + "..."


def render_error(cache: TokenCache, indices, err: Exception) -> CacheError:
    """A backend failed to render images `indices` (DALI and FFCV name neither the image nor
    the file): decode each with Pillow and name the damaged ones with their shard and bytes."""
    from beitfast.data.images import BadImage, decode_rgb

    bad = []
    for j in dict.fromkeys(int(j) for j in indices):
        try:
            decode_rgb(cache.item(j)[0].tobytes())
        except BadImage:
            bad.append(j)
    if bad:
        where = "; ".join(f"image {j} ({cache.locate(j)})" for j in bad[:5])
        return CacheError(f"{cache.path}: {len(bad)} cached image(s) cannot be decoded: {where}. The cache is "
                          f"damaged: check it with data_prep/verify_cache.py and rebuild it ({one_line(err)})")
    return CacheError(f"{cache.path}: rendering images {list(indices)[:8]}... failed: {one_line(err)}")


def image_dtype(cfg) -> torch.dtype:
    return torch.float16 if cfg.train.precision in ("bf16", "fp16") else torch.float32


def render_args(cfg, view: str) -> dict:
    """What a backend renders: size and resampler of the view, and its normalisation (None
    for the tokenizer's uint8 input)."""
    if view == "vit":
        return {"size": cfg.model.img_size, "interp": "cubic", "normalize": (tuple(cfg.data.mean), tuple(cfg.data.std))}
    if view == "tokenizer":
        return {"size": cfg.data.tokenizer_img_size, "interp": "lanczos", "normalize": None}
    raise ValueError(f"view must be 'vit' or 'tokenizer', got {view!r}")


def pipeline_args(cfg, view: str) -> dict:
    """render_args plus the DALI output type."""
    from nvidia.dali import types

    args = render_args(cfg, view)
    args["dtype"] = types.FLOAT16 if image_dtype(cfg) == torch.float16 else types.FLOAT
    return args
