"""Linear probing of a pretrained encoder (the reference protocol, REFERENCE.md section 5).

    python beitfast/linprobe.py --ckpt runs/demo/pretrain/ckpt.pt --data data/toy_imagenet --out runs/probe
    python beitfast/linprobe.py --ckpt random --cfg tiny.yaml --data data/toy_imagenet --out runs/probe_random
    python beitfast/linprobe.py --pixels --cfg tiny.yaml --data data/toy_imagenet --out runs/probe_pixels

The encoder is frozen, so its features are computed once per split and cached in `--out`
(`features-<split>.pt`, written atomically; a re-run reuses them). For every block one linear
head is trained on the concatenation of the CLS token and the mean of the patch tokens after
that block; the best block is reported, as the reference does. `--ckpt random` probes a
randomly initialised encoder of the configured size (seeded), `--pixels` the raw pixels
(the view downsampled to 16x16): the floors a pretrained encoder must clear.

Deviations from the reference script, for a probe that trains in seconds on a CPU: one fixed
view per image (resize the short side, centre crop) instead of random-resized-crop + flip
while the heads train, so features can be cached; each feature standardised with the
training split's mean and std (no learnt parameters: the reference has no BatchNorm, and
unscaled features of different blocks would need a learning rate each); full-batch AdamW
(weight decay 1e-4, cosine schedule) on the cached features. The same features also feed a
weighted kNN classifier (DINO's: cosine similarity, k = 20, temperature 0.07; `--knn-k`,
`--knn-t`), reported per block under "knn". Results: `probe.json` (per-block and best accuracy),
last line of the output one JSON object.
"""
from __future__ import annotations

import argparse
import json
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
from beitfast.data.images import BadImage, decode_rgb, list_imagefolder  # noqa: E402
from beitfast.model import Beit, BeitArgs  # noqa: E402
from beitfast.runlog import atomic_save  # noqa: E402

FEATURES_FORMAT = "beitfast-probe-features/1"


def load_encoder(ckpt: str, cfg, seed: int = 0) -> tuple[Beit, dict, int]:
    """The encoder to probe: a pretraining checkpoint of ours or of the reference (their
    `['model']` key names are ours), or 'random' (the configured model, seeded init). Returns
    (model in eval mode, what it is, its input size)."""
    if ckpt == "random":
        torch.manual_seed(seed)
        return Beit(BeitArgs.from_config(cfg.model)).eval(), {"encoder": "random", "seed": seed}, cfg.model.img_size
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such checkpoint (or pass --ckpt random)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"--ckpt {ckpt}: not a checkpoint with a 'model' state dict")
    mcfg = cfg.model
    if isinstance(ck.get("config"), dict):  # our checkpoints carry the model they were trained as
        from beitfast.config import ModelConfig, _build

        mcfg = _build(ModelConfig, ck["config"]["model"], {}, "model.")
    model = Beit(BeitArgs.from_config(mcfg))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"--ckpt {ckpt}: its weights do not fit a {mcfg.size} BEiT at {mcfg.img_size} px "
                         f"({str(e).splitlines()[0]})") from None
    return model.eval(), {"encoder": str(path), "step": ck.get("step")}, mcfg.img_size


def center_view(data: bytes, name: str, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the short side resized to size (bicubic), centre crop."""
    from PIL import Image

    img = Image.fromarray(decode_rgb(data, name))
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    x, y = (w - size) // 2, (h - size) // 2
    return torch.from_numpy(np.array(img.crop((x, y, x + size, y + size)))).permute(2, 0, 1).contiguous()


@torch.no_grad()
def block_features(model: Beit, x: torch.Tensor) -> torch.Tensor:
    """(L, B, 2D): per block, [CLS token, mean of the patch tokens] after that block."""
    t, bias = model.embed(x)
    out = []
    for blk in model.blocks:
        t = blk(t, bias)
        out.append(torch.cat((t[:, 0], t[:, 1:].mean(1)), dim=-1))
    return torch.stack(out)


def extract(encoder, root: str, split: str, size: int, mean, std, batch: int, progress: bool,
            pixels: bool = False) -> dict:
    """Features of every decodable image of `root/split` (an unreadable file is skipped and
    listed): {'features' (L, N, F) float32, 'labels' (N,), 'skipped': [...]}."""
    from beitfast.progress import progress_bar

    files, labels, classes = list_imagefolder(root, split)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    feats, keep, skipped, buf = [], [], [], []

    def flush():
        x = (torch.stack([b for b, _ in buf]).float() / 255 - m) / s
        if pixels:
            feats.append(F.adaptive_avg_pool2d(x, 16).flatten(1)[None])
        else:
            feats.append(block_features(encoder, x))
        keep.extend(i for _, i in buf)
        buf.clear()

    for i, f in enumerate(progress_bar(files, desc=f"features {split}", unit="img", disable=not progress)):
        try:
            buf.append((center_view((Path(root) / f).read_bytes(), f, size), i))
        except (BadImage, OSError) as e:
            skipped.append({"file": f, "why": str(e)})
            continue
        if len(buf) == batch:
            flush()
    if buf:
        flush()
    if not keep:
        raise ValueError(f"{root}/{split}: no image could be decoded")
    return {"features": torch.cat(feats, dim=1), "labels": torch.from_numpy(labels[keep]), "classes": classes,
            "skipped": skipped}


def cached_features(out: Path, split: str, key: dict, make) -> dict:
    """`make()`'s result, cached in out/features-<split>.pt under `key` (the encoder, data and
    view): reused when the key matches, rebuilt (and said) when it does not."""
    path = out / f"features-{split}.pt"
    if path.exists():
        try:
            old = torch.load(path, weights_only=False)
        except Exception as e:  # a damaged cache file is rebuilt, not trusted
            print(f"[probe] {path} unreadable ({type(e).__name__}), recomputing")
            old = None
        if old is not None and old.get("format") == FEATURES_FORMAT and old.get("key") == key:
            print(f"[probe] reusing {path}")
            return old
        if old is not None:
            print(f"[probe] {path} was computed for other settings, recomputing")
    res = dict(make(), format=FEATURES_FORMAT, key=key)
    atomic_save(res, path)
    return res


def train_heads(tr: dict, va: dict, epochs: int, lr: float, wd: float, seed: int) -> dict:
    """One linear head per block, trained together (full batch, AdamW, cosine): top-1 on
    the validation features for each block."""
    xt, yt = tr["features"], tr["labels"]
    mu, sd = xt.mean(1, keepdim=True), xt.std(1, keepdim=True).clamp_min(1e-6)
    xt, xv = (xt - mu) / sd, (va["features"] - mu) / sd
    n_blocks, _, dim = xt.shape
    n_cls = int(max(yt.max(), va["labels"].max())) + 1
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n_blocks, dim, n_cls, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(n_blocks, 1, n_cls, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=wd)
    for e in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * e / epochs))
        logits = torch.bmm(xt, w) + b  # (L, N, C)
        loss = F.cross_entropy(logits.reshape(-1, n_cls), yt.repeat(n_blocks)) * n_blocks
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (torch.bmm(xv, w) + b).argmax(-1)
        acc = (pred == va["labels"][None]).float().mean(1)
    return {"per_block": [round(float(a), 4) for a in acc], "best_block": int(acc.argmax()) + 1,
            "acc": round(float(acc.max()), 4)}


@torch.no_grad()
def knn_accuracy(tr: dict, va: dict, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict:
    """Weighted kNN on frozen features as DINO evaluates it, for every block: each feature
    L2-normalised, the k most cosine-similar training features vote for their class with weight
    exp(similarity / temperature); top-1 of the vote on the validation features."""
    xt, yt, xv, yv = F.normalize(tr["features"], dim=-1), tr["labels"], F.normalize(va["features"], dim=-1), va["labels"]
    n_cls = int(max(yt.max(), yv.max())) + 1
    k = min(k, xt.shape[1])
    accs = []
    for b in range(xt.shape[0]):
        correct = 0
        for i in range(0, xv.shape[1], chunk):
            sim, idx = (xv[b, i:i + chunk] @ xt[b].T).topk(k, dim=1)
            votes = torch.zeros(sim.shape[0], n_cls).scatter_add_(1, yt[idx], (sim / temperature).exp())
            correct += int((votes.argmax(1) == yv[i:i + chunk]).sum())
        accs.append(correct / xv.shape[1])
    best = max(range(len(accs)), key=accs.__getitem__)
    return {"per_block": [round(a, 4) for a in accs], "best_block": best + 1, "acc": round(accs[best], 4), "k": k,
            "temperature": temperature}


def probe(args) -> dict:
    cfg = load_config(args.cfg, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.model.img_size
    if args.pixels:
        encoder, what = None, {"encoder": "pixels (16x16 view)"}
    else:
        encoder, what, size = load_encoder(args.ckpt, cfg, args.seed)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    key = {**what, "data": str(Path(args.data).resolve()), "size": size}
    if args.ckpt != "random" and not args.pixels:
        key["ckpt_mtime"] = os.path.getmtime(args.ckpt)
    feats = {}
    for split in ("train", args.val_split):
        feats[split] = cached_features(out, split, dict(key, split=split), lambda: extract(
            encoder, args.data, split, size, cfg.data.mean, cfg.data.std, args.batch, not args.no_progress,
            args.pixels))
        if feats[split]["skipped"]:
            print(f"[probe] {split}: {len(feats[split]['skipped'])} unreadable file(s) skipped, e.g. "
                  f"{feats[split]['skipped'][0]['file']}")
    res = train_heads(feats["train"], feats[args.val_split], args.epochs, args.lr, args.wd, args.seed)
    res["knn"] = knn_accuracy(feats["train"], feats[args.val_split], args.knn_k, args.knn_t)
    res.update(what, train_images=int(len(feats["train"]["labels"])),
               val_images=int(len(feats[args.val_split]["labels"])), epochs=args.epochs)
    atomic_write_json(out / "probe.json", res)
    print(f"[probe] {what['encoder']}: best block {res['best_block']} of {len(res['per_block'])}, top-1 "
          f"{res['acc']:.4f} on {res['val_images']} {args.val_split} images -> {out / 'probe.json'}")
    print(f"[probe] kNN (k={res['knn']['k']}, T={res['knn']['temperature']}): best block {res['knn']['best_block']}, "
          f"top-1 {res['knn']['acc']:.4f}")
    print(json.dumps(res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--ckpt", default="random", help="pretraining checkpoint, or 'random' (default)")
    ap.add_argument("--pixels", action="store_true", help="probe the raw pixels instead of an encoder")
    ap.add_argument("--cfg", default="tiny.yaml", help="config of the model and data (a checkpoint's own wins)")
    ap.add_argument("--data", required=True, help="ImageNet-layout root with train/ and val/")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--out", required=True, help="directory for cached features and probe.json")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN probe (DINO's 20)")
    ap.add_argument("--knn-t", type=float, default=0.07, help="temperature of the kNN vote weights (DINO's 0.07)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    try:
        probe(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"linprobe: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
