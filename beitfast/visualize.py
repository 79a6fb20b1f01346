"""Pictures of a pretrained BEiT: the last block's self-attention (paper Figure 2), or what it predicts.

    python beitfast/visualize.py --ckpt runs/demo/pretrain/ckpt.pt --data data/toy_imagenet --out runs/vis
    python beitfast/visualize.py --ckpt random --cfg tiny.yaml --data data/toy_imagenet --out runs/vis_random

For each of `--images` validation images (spread over the classes): the image with a
blockwise mask of the configured masking (the patches the model has to predict shaded), the
image with the reference points, and for each reference point the attention of its patch to
every patch in the last block (mean over heads; a head's own map with --head), upsampled and
laid over the image. Written atomically as `<out>/attention.png` plus `<out>/attention.json`
(images, points, and each map's entropy against a uniform map's, a number to compare
pretrained and random encoders by); a re-run overwrites them.

    python beitfast/visualize.py --predictions --ckpt runs/demo/pretrain/ckpt.pt --data data/toy_imagenet_rp \
        --tokenizer runs/demo/dvae_tiny/tokenizer.pt --out runs/vis

`--predictions` draws instead, per image: the image, its blockwise mask, the target tokens (the
tokenizer on the image) decoded back to pixels by the dVAE's decoder, and the model's argmax
tokens at the masked positions (the targets elsewhere) decoded the same way; the share of
masked tokens it got right per image goes to `<out>/predictions.json`. With the DALL-E tokenizer,
`--decoder decoder.pkl` (OpenAI's pickled decoder, read through an allow-list of its classes).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast.config import ConfigError, load_config  # noqa: E402
from beitfast.data.cache import atomic_write_json  # noqa: E402
from beitfast.data.images import BadImage, list_imagefolder  # noqa: E402
from beitfast.linprobe import center_view, load_encoder  # noqa: E402
from beitfast.masking import MaskGenerator, MaskSpec  # noqa: E402
from beitfast.model import Attention, Beit  # noqa: E402

DEFAULT_POINTS = "0.3,0.3;0.5,0.5;0.7,0.7"


def attention_probs(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The softmax attention (B, heads, N, N) that `attn(x, bias)` applies (x already normed):
    the same projections, q scaled by head_dim^-0.5, the shared and the block's own bias."""
    b, n, c = x.shape
    qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(b, n, 3, attn.heads, c // attn.heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * (c // attn.heads) ** -0.5) @ k.transpose(-2, -1)
    if attn.relative_position_bias_table is not None:
        idx = attn.relative_position_index
        own = attn.relative_position_bias_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)
        bias = own if bias is None else bias + own
    if bias is not None:
        scores = scores + bias[None]
    return scores.softmax(-1)


@torch.no_grad()
def last_attention(model: Beit, x: torch.Tensor, block: int = -1) -> torch.Tensor:
    """(B, heads, N+1, N+1) attention probabilities of `block` (default the last) on images x."""
    t, bias = model.embed(x)
    stop = block % len(model.blocks)
    for i, blk in enumerate(model.blocks):
        if i == stop:
            return attention_probs(blk.attn, blk.norm1(t), bias)
        t = blk(t, bias)
    raise AssertionError("unreachable")


def parse_points(text: str) -> list[tuple[float, float]]:
    """'y,x;y,x' in fractions of the image -> [(y, x)]; a clear error otherwise."""
    pts = []
    for part in text.split(";"):
        try:
            y, x = (float(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"--points: cannot read {part!r}; expected 'y,x;y,x' with fractions in [0, 1)") from None
        if not (0 <= y < 1 and 0 <= x < 1):
            raise ValueError(f"--points: {part!r} is outside the image; fractions must be in [0, 1)")
        pts.append((y, x))
    return pts


def pick_images(root: str, split: str, n: int) -> list[tuple[str, int]]:
    """n (file, label) pairs spread over the classes: the first image of class 0, 1, ... in turn."""
    files, labels, _ = list_imagefolder(root, split)
    by_class = [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)]
    out, r = [], 0
    while len(out) < n and any(r < len(b) for b in by_class):
        out += [(files[b[r]], int(labels[b[r]])) for b in by_class if r < len(b)][: n - len(out)]
        r += 1
    return out


def read_views(root: str, split: str, picks: list[tuple[str, int]], sizes: tuple[int, ...],
               progress: bool = False) -> tuple[list[torch.Tensor], list[tuple[str, int]]]:
    """The centre view of each picked image at each of `sizes` (uint8, one stacked batch a size)
    and the (file, label) pairs kept; an unreadable image is named on stderr and left out."""
    from beitfast.progress import progress_bar

    views, kept = [[] for _ in sizes], []
    for f, label in progress_bar(picks, desc="images", unit="img", disable=not progress):
        try:
            data = (Path(root) / f).read_bytes()
            got = [center_view(data, f, s) for s in sizes]
        except (BadImage, OSError) as e:
            print(f"[visualize] left out: {e}", file=sys.stderr)
            continue
        for v, g in zip(views, got):
            v.append(g)
        kept.append((f, label))
    if not kept:
        raise ValueError(f"{root}/{split}: no image could be decoded")
    return [torch.stack(v) for v in views], kept


def save_figure(fig, out: Path, name: str) -> Path:
    """Write `fig` as out/name atomically (a temporary file renamed) and close it."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out / name)
    return out / name


def draw(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = load_config(args.cfg, args.overrides)
    model, what, size = load_encoder(args.ckpt, cfg, args.seed)
    grid = model.grid[0]
    points = parse_points(args.points)
    (u8,), kept = read_views(args.data, args.split, pick_images(args.data, args.split, args.images), (size,),
                             not args.no_progress)
    m, s = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    att = last_attention(model, (u8.float() / 255 - m) / s, args.block)  # (B, H, N+1, N+1)
    att = att[:, args.head] if args.head is not None else att.mean(1)  # (B, N+1, N+1)
    masks = MaskGenerator(MaskSpec.from_config(cfg.mask, grid), seed=cfg.mask.seed)(np.arange(len(u8)))
    cols = 2 + len(points)
    fig, axes = plt.subplots(len(u8), cols, figsize=(2.0 * cols, 2.05 * len(u8)), squeeze=False)
    uniform = math.log(grid * grid)
    rows = []
    for b, (row, (f, label)) in enumerate(zip(axes, kept)):
        pic = u8[b].permute(1, 2, 0).numpy()
        row[0].imshow(pic)
        shade = np.kron(masks[b], np.ones((size // grid, size // grid)))
        row[0].imshow(np.dstack([np.zeros_like(shade)] * 3 + [shade * 0.65]))
        row[0].set_title(f"class {label}: {int(masks[b].sum())} masked", fontsize=7)
        row[1].imshow(pic)
        row[1].set_title("reference points", fontsize=7)
        ent = []
        for p, (py, px) in enumerate(points):
            q = 1 + int(py * grid) * grid + int(px * grid)  # the query patch (token 0 is CLS)
            amap = att[b, q, 1:].reshape(grid, grid)
            amap = amap / amap.sum()
            ent.append(float(-(amap * amap.clamp_min(1e-12).log()).sum()) / uniform)
            up = F.interpolate(amap[None, None], size=(size, size), mode="nearest")[0, 0].numpy()
            cy, cx = (int(py * grid) + 0.5) * size / grid, (int(px * grid) + 0.5) * size / grid
            row[1].plot(cx, cy, "o", ms=5, mec="white", mfc=f"C{p}")
            row[2 + p].imshow(pic)
            row[2 + p].imshow(up, cmap="inferno", alpha=0.7)
            row[2 + p].plot(cx, cy, "o", ms=5, mec="white", mfc=f"C{p}")
            row[2 + p].set_title(f"point {p}: entropy {ent[-1]:.2f}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        rows.append({"file": f, "label": label, "masked": int(masks[b].sum()), "entropy": [round(e, 4) for e in ent]})
    fig.suptitle(f"{what['encoder']}: block {args.block % len(model.blocks) + 1} of {len(model.blocks)} "
                 f"self-attention ({'head ' + str(args.head) if args.head is not None else 'mean of heads'})",
                 fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    save_figure(fig, out, "attention.png")
    res = {**what, "points": points, "block": args.block % len(model.blocks) + 1, "images": rows,
           "mean_entropy": round(float(np.mean([e for r in rows for e in r["entropy"]])), 4),
           "png": str(out / "attention.png")}
    atomic_write_json(out / "attention.json", res)
    print(f"[visualize] {len(rows)} images x {len(points)} points, mean attention entropy "
          f"{res['mean_entropy']:.3f} of uniform -> {out / 'attention.png'}")
    return res


def draw_predictions(args) -> dict:
    """Per image: the image, its blockwise mask, the target tokens decoded back to pixels, and the
    model's argmax tokens at the masked positions (targets elsewhere) decoded the same way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from beitfast.tokenizers import build_tokenizer
    from beitfast.tokenizers.dvae import decode_tokens, load_decoder

    cfg = load_config(args.cfg, args.overrides)
    model, what, size = load_encoder(args.ckpt, cfg, args.seed)
    if model.args.target != "tokens":
        raise ValueError(f"--ckpt {args.ckpt} predicts pixels (model.target={model.args.target}), not tokens")
    if args.tokenizer:
        cfg.tokenizer.path = args.tokenizer
    tok_path = cfg.tokenizer.path
    dec_path = args.decoder or (tok_path if cfg.tokenizer.kind == "dvae" else "")
    if not dec_path:
        raise ValueError("--decoder: the DALL-E tokenizer's decoder is a file of its own (OpenAI's decoder.pkl)")
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data.tokenizer_img_size)  # names the file when it is wrong
    tok_size = tokenizer.input_size
    dvae = load_decoder(dec_path)
    grid = model.grid[0]
    if tokenizer.grid != (grid, grid) or tokenizer.vocab_size > model.args.vocab_size or \
            dvae.arch.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"tokenizer {tok_path}: a {tuple(tokenizer.grid)} grid of {tokenizer.vocab_size} tokens, decoder "
                         f"{dec_path}: {dvae.arch.vocab_size}; the model predicts {grid}x{grid} of "
                         f"{model.args.vocab_size}")
    (u8, tok_u8), kept = read_views(args.data, args.split, pick_images(args.data, args.split, args.images),
                                    (size, tok_size))
    target = tokenizer.encode(tok_u8).long()  # (B, grid, grid)
    masks = torch.from_numpy(MaskGenerator(MaskSpec.from_config(cfg.mask, grid), seed=cfg.mask.seed)(
        np.arange(len(u8)))).bool()
    m, s = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.masked_logits((u8.float() / 255 - m) / s, masks)
    pred = target.clone()
    pred[masks] = logits[:, :tokenizer.vocab_size].argmax(-1)
    tgt_px, pred_px = decode_tokens(dvae, target), decode_tokens(dvae, pred)
    fig, axes = plt.subplots(len(u8), 4, figsize=(8.0, 2.1 * len(u8)), squeeze=False)
    rows = []
    for b, (row, (f, label)) in enumerate(zip(axes, kept)):
        pic = u8[b].permute(1, 2, 0).numpy()
        shade = np.kron(masks[b].numpy(), np.ones((size // grid, size // grid)))
        acc = float((pred[b][masks[b]] == target[b][masks[b]]).float().mean())
        row[0].imshow(pic)
        row[0].set_title(f"class {label}", fontsize=7)
        row[1].imshow(pic)
        row[1].imshow(np.dstack([np.zeros_like(shade)] * 3 + [shade * 0.75]))
        row[1].set_title(f"mask: {int(masks[b].sum())} patches", fontsize=7)
        row[2].imshow(tgt_px[b].permute(1, 2, 0).numpy())
        row[2].set_title("target tokens, decoded", fontsize=7)
        row[3].imshow(pred_px[b].permute(1, 2, 0).numpy())
        row[3].set_title(f"predicted at the mask ({100 * acc:.0f}% right)", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        rows.append({"file": f, "label": label, "masked": int(masks[b].sum()), "token_acc": round(acc, 4)})
    fig.suptitle(f"{what['encoder']}: masked-token predictions, decoded by {Path(dec_path).name}", fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    save_figure(fig, out, "predictions.png")
    res = {**what, "tokenizer": str(tok_path), "decoder": str(dec_path), "images": rows,
           "token_acc": round(float(np.mean([r["token_acc"] for r in rows])), 4), "png": str(out / "predictions.png")}
    atomic_write_json(out / "predictions.json", res)
    print(f"[visualize] predictions of {len(rows)} images: {100 * res['token_acc']:.1f}% of the masked tokens right "
          f"-> {out / 'predictions.png'}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="visualize.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--ckpt", default="random", help="pretraining checkpoint (ours or the reference's), or 'random'")
    ap.add_argument("--cfg", default="tiny.yaml", help="config of the model, data and masking (a checkpoint's model wins)")
    ap.add_argument("--data", required=True, help="ImageNet-layout root")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", required=True, help="directory for attention.png and attention.json")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--points", default=DEFAULT_POINTS, help=f"reference points 'y,x;y,x' (default {DEFAULT_POINTS})")
    ap.add_argument("--block", type=int, default=-1, help="which block's attention (default -1, the last)")
    ap.add_argument("--head", type=int, default=None, help="one head's map instead of the mean over heads")
    ap.add_argument("--seed", type=int, default=0, help="init seed of --ckpt random")
    ap.add_argument("--predictions", action="store_true", help="draw what the model predicts at the masked patches "
                    "(predictions.png, predictions.json) instead of the attention maps")
    ap.add_argument("--tokenizer", default="", help="the tokenizer that makes the targets (default tokenizer.path; "
                    "its kind is tokenizer.kind)")
    ap.add_argument("--decoder", default="", help="what draws tokens as pixels: a dVAE tokenizer.pt (default: the "
                    "dVAE tokenizer itself) or OpenAI's DALL-E decoder.pkl (needed with tokenizer.kind=dalle)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    try:
        draw_predictions(args) if args.predictions else draw(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"visualize: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
