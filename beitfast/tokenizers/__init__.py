"""Image tokenizers: `build_tokenizer(cfg)` for the config's `tokenizer.kind`."""
from __future__ import annotations

from beitfast.tokenizers.base import Tokenizer, weights_checksum  # noqa: F401


def build_tokenizer(tok_cfg, input_size: int, device="cpu") -> Tokenizer:
    """`tokenizer.kind: dalle` (OpenAI's encoder.pkl or a state dict) or `dvae` (a checkpoint
    exported by data_prep/train_dvae.py), from `tokenizer.path`."""
    if not tok_cfg.path:
        raise ValueError("tokenizer.path is empty: point it at the tokenizer's weights")
    if tok_cfg.kind == "dalle":
        from beitfast.tokenizers.dalle import DalleTokenizer

        return DalleTokenizer.from_file(tok_cfg.path, input_size, tok_cfg.batch_size, device, tok_cfg.precision)
    if tok_cfg.kind == "dvae":
        from beitfast.tokenizers.dvae import DVAETokenizer

        tok = DVAETokenizer.from_file(tok_cfg.path, tok_cfg.batch_size, device, tok_cfg.precision)
        if tok.input_size != input_size:
            raise ValueError(f"{tok_cfg.path}: dVAE was trained at {tok.input_size} px but the config asks "
                             f"for data.tokenizer_img_size={input_size}")
        return tok
    raise ValueError(f"unknown tokenizer.kind {tok_cfg.kind!r} (dalle or dvae)")
