"""Semantic segmentation fine-tuning of a pretrained BEiT (ADE20K; the seeds' second task).

    torchrun --nproc_per_node 8 beitfast/segment.py --cfg seg_ade20k_base.yaml \\
        model.pretrained=runs/base/ckpt.pt data.root=/data/ADEChallengeData2016
    python beitfast/segment.py --cfg seg_tiny.yaml model.pretrained=runs/demo/pretrain/ckpt.pt   # toy set, CPU

Backbone: the BEiT encoder (timm's, loaded as finetune.py loads it: our / the reference's
pretraining checkpoints or timm weights; relative-position tables resampled to
model.img_size), giving the outputs of blocks `model.out_indices` (4, 6, 8, 12 for base) as
maps at stride `patch`, made into strides patch/4, patch/2, patch, 2 x patch (4, 8, 16, 32
at patch 16) by two transposed convolutions (with BatchNorm and GELU between), one,
identity and max-pooling, as the reference's segmentation backbone does. Task layers:
UperNet (pyramid pooling 1/2/3/6 on the coarsest map, FPN, fused; the reference's released
configs) or SETR-PUP (four 3x3 conv + 2x upsampling stages on the stride-16 map; the seeds'
choice), each with an FCN auxiliary head on the third map (loss weight model.aux_weight).

Recipe (the reference's ADE20K config for self-supervised BEiT-B): 512x512 crops, batch 16,
160k iterations, AdamW lr 7e-4, weight decay 0.05, layer decay 0.65 (head and necks at the top
rate), linear warm-up over 1,500 iterations then poly decay (power 1); data: resize with the
(2048, 512) bound x a ratio in [0.5, 2], random crop with at most 75% of one class, flip,
photometric distortion; cross-entropy with ignore index 255 after reduce_zero_label.
Evaluation: single-scale sliding-window inference (window model.img_size, train.stride),
logits resized back to each image, mIoU / per-class IoU / pixel accuracy over the
validation split, and `predictions.png` (image, ground truth, prediction). Batches follow the
StepSampler and every image's augmentation is seeded by (seed, pass, index), so a run
killed at any iteration resumes from ckpt.pt to the same weights. Outputs in log.out_dir:
config.yaml, metrics.jsonl, ckpt.pt, eval.json; the last line printed is one JSON object.

ADE20K layout (`data.root`, as ADEChallengeData2016 unpacks): images/{training,validation}/
*.jpg and annotations/{training,validation}/*.png (8-bit labels, 0 = unlabelled, 1..150 the
classes), matched by file stem.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast import selfcheck  # noqa: E402
from beitfast.config import ConfigError, SegConfig  # noqa: E402
from beitfast.data.sampler import StepSampler  # noqa: E402
from beitfast.distributed import trainer_main  # noqa: E402
from beitfast.finetune import build_classifier, layer_id, load_pretrained, train_batches  # noqa: E402
from beitfast.steploop import accumulation, autocast, resume_run, train_steps  # noqa: E402

CKPT_FORMAT = "beitfast-seg-ckpt/1"
PROG = "segment"
IGNORE = 255


# ----------------------------------------------------------------------------- data
def list_ade20k(root: str, split: str) -> list[tuple[str, str]]:
    """(image, annotation) path pairs of an ADE20K-layout split, matched by stem; a clear
    error naming what is missing."""
    img_dir, ann_dir = Path(root) / "images" / split, Path(root) / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no {d} (expected the ADE20K layout: images/{split}/*.jpg and "
                                    f"annotations/{split}/*.png under {root})")
    anns = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs, missing = [], []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
            if p.stem in anns:
                pairs.append((str(p), str(anns[p.stem])))
            else:
                missing.append(p.name)
    if missing:
        raise FileNotFoundError(f"{ann_dir}: no annotation for {len(missing)} image(s), e.g. {missing[0]}")
    if not pairs:
        raise FileNotFoundError(f"{img_dir} holds no images")
    return pairs


def read_pair(img_path: str, ann_path: str, reduce_zero_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (H, W, 3) and uint8 labels (H, W) with 255 = ignore; reduce_zero_label maps
    0 -> 255 and k -> k - 1 (ADE20K). Mismatched sizes are an error naming the files."""
    from PIL import Image

    from beitfast.data.images import decode_rgb

    img = decode_rgb(Path(img_path).read_bytes(), img_path)
    try:
        lab = np.array(Image.open(ann_path))
    except Exception as e:
        raise ValueError(f"{ann_path}: cannot read the annotation ({type(e).__name__}: {e})") from None
    if lab.ndim != 2 or lab.shape != img.shape[:2]:
        raise ValueError(f"{ann_path}: a {lab.shape} label map for a {img.shape[:2]} image {img_path}")
    lab = lab.astype(np.uint8)
    if reduce_zero_label:
        lab = np.where(lab == 0, IGNORE, lab.astype(np.int16) - 1).astype(np.uint8)
    return img, lab


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio resize: the largest size with long side <= max(scale) and short side
    <= min(scale)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def resize_pair(img, lab, size):
    import cv2

    h, w = size
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    lab = None if lab is None else cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST)
    return img, lab


def photometric(img: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness +-32, contrast x[0.5, 1.5] (before or after the
    colour ops), saturation x[0.5, 1.5], hue +-18 (OpenCV's 0..180 scale), each with p 0.5."""
    import cv2

    x = img.astype(np.float32)

    def contrast(x):
        return x * g.uniform(0.5, 1.5) if g.random() < 0.5 else x

    if g.random() < 0.5:
        x = x + g.uniform(-32, 32)
    mode = g.integers(2)
    if mode == 1:
        x = contrast(x)
    hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    if g.random() < 0.5:
        hsv[..., 1] = np.clip(hsv[..., 1] * g.uniform(0.5, 1.5), 0, 255)
    if g.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + g.integers(-18, 19)) % 180
    x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if mode == 0:
        x = contrast(x)
    return np.clip(x, 0, 255).astype(np.uint8)


def random_crop(img, lab, crop: int, cat_max_ratio: float, g: np.random.Generator):
    """A crop x crop window (smaller images keep their size); up to 10 draws for one where no
    class covers more than cat_max_ratio of the labelled pixels, as mmseg's RandomCrop."""
    h, w = lab.shape
    ch, cw = min(crop, h), min(crop, w)
    for _ in range(10):
        y, x = int(g.integers(h - ch + 1)), int(g.integers(w - cw + 1))
        win = lab[y:y + ch, x:x + cw]
        counts = np.bincount(win[win != IGNORE].ravel(), minlength=1)
        if cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio):
            break
    return img[y:y + ch, x:x + cw], lab[y:y + ch, x:x + cw]


def to_tensor(img: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    return (x - 255 * torch.tensor(mean).view(3, 1, 1)) / (255 * torch.tensor(std).view(3, 1, 1))


class SegTrainStream(torch.utils.data.Dataset):
    """Sample n of the rank's stream -> (normalised crop padded to img_size, labels padded
    with 255). Image j in pass e is augmented from a generator seeded by (seed, e, j)."""

    def __init__(self, pairs, sampler: StepSampler, d, crop: int, seed: int):
        self.pairs, self.sampler, self.d, self.crop, self.seed = pairs, sampler, d, crop, seed

    def __getitem__(self, n: int):
        epoch, j = self.sampler.sample(n)
        g = np.random.default_rng([self.seed, epoch, j])
        img, lab = read_pair(*self.pairs[j], self.d.reduce_zero_label)
        ratio = g.uniform(*self.d.ratio_range)
        scale = (int(self.d.img_scale[0] * ratio), int(self.d.img_scale[1] * ratio))
        img, lab = resize_pair(img, lab, rescale_size(*lab.shape, scale))
        img, lab = random_crop(img, lab, self.crop, self.d.cat_max_ratio, g)
        if g.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        img = photometric(img, g)
        x = torch.zeros(3, self.crop, self.crop)
        y = torch.full((self.crop, self.crop), IGNORE, dtype=torch.long)
        h, w = lab.shape
        x[:, :h, :w] = to_tensor(img, self.d.mean, self.d.std)
        y[:h, :w] = torch.from_numpy(np.ascontiguousarray(lab)).long()
        return x, y

    def __len__(self):
        return 1 << 62


# ----------------------------------------------------------------------------- model
def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BeitBackbone(nn.Module):
    """Four feature maps from the BEiT encoder's blocks `out_indices`, at strides patch/4,
    patch/2, patch and 2 x patch (the reference's fpn1..fpn4)."""

    def __init__(self, m):
        super().__init__()
        self.vit = build_classifier(m, 0)
        self.out_indices = list(m.out_indices)
        # blocks after the last chosen one, the final norms and the head take no part: dropped,
        # so DDP sees no parameter without a gradient
        self.vit.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)
        dim = self.vit.embed_dim
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the four maps, the last chosen block's output at stride patch)."""
        feats = self.vit.forward_intermediates(x, indices=self.out_indices, output_fmt="NCHW",
                                               intermediates_only=True, stop_early=True)
        return [f(t) for f, t in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)], feats[3]


class UperHead(nn.Module):
    """UperNet: pyramid pooling (1, 2, 3, 6) on the coarsest map, top-down FPN, all levels
    upsampled to the finest and fused by a 3x3 conv; dropout 0.1, 1x1 classifier."""

    def __init__(self, dim: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.scales = pool_scales
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1)) for s in pool_scales)
        self.bottleneck = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.cls = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        psp = [top] + [F.interpolate(p(top), size=top.shape[2:], mode="bilinear", align_corners=False) for p in self.ppm]
        lat = [lc(f) for lc, f in zip(self.lateral, feats[:3])] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(3, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="bilinear", align_corners=False)
        outs = [c(t) for c, t in zip(self.fpn, lat[:3])] + [lat[3]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.cls(self.fuse(torch.cat(outs, 1)))


class PupHead(nn.Module):
    """SETR-PUP: the last block's map at stride `patch` (block 12) through log2(patch) stages of 3x3 conv +
    BN + ReLU + 2x bilinear upsampling (SETR's four at patch 16: back to stride 1), then a 1x1 classifier."""

    def __init__(self, dim: int, channels: int, num_classes: int, stages: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.stages = nn.ModuleList(conv_bn_relu(dim if i == 0 else channels, channels, 3) for i in range(stages))
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, last: torch.Tensor) -> torch.Tensor:
        x = self.norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for s in self.stages:
            x = F.interpolate(s(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.cls(x)


class Segmenter(nn.Module):
    def __init__(self, cfg: SegConfig):
        super().__init__()
        m, n = cfg.model, cfg.data.num_classes
        self.backbone = BeitBackbone(m)
        dim = self.backbone.vit.embed_dim
        self.decode_head = UperHead(dim, m.channels, n) if m.head == "upernet" else \
            PupHead(dim, m.channels, n, stages=m.patch_size.bit_length() - 1)  # back to stride 1
        self.aux_head = nn.Sequential(conv_bn_relu(dim, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, n, 1)) \
            if m.aux_weight > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits at the input's size, auxiliary logits or None)."""
        feats, last = self.backbone(x)
        out = self.decode_head(feats if isinstance(self.decode_head, UperHead) else last)
        out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(feats[2]), size=x.shape[2:], mode="bilinear", align_corners=False)
        return out, aux


def seg_param_groups(model: Segmenter, weight_decay: float, layer_decay: float) -> list[dict]:
    """The reference's layer decay for segmentation: encoder parameters by block as in
    fine-tuning, the necks and heads at the top rate; no decay for 1-D, biases, cls_token, pos_embed."""
    depth = len(model.backbone.vit.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name[len("backbone.vit."):] if name.startswith("backbone.vit.") else None
        lid = layer_id(inner, depth) if inner is not None else depth + 1
        no_decay = p.ndim == 1 or name.endswith(".bias") or inner in ("cls_token", "pos_embed")
        g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def poly_lr(it: int, o, total: int) -> float:
    """mmseg's poly schedule with linear warm-up (warmup_ratio of the poly value at it = 0)."""
    lr = (o.lr - o.min_lr) * (1 - it / total) ** o.power + o.min_lr
    if it < o.warmup_iters:
        lr = lr * (1 - (1 - it / o.warmup_iters) * (1 - o.warmup_ratio))
    return lr


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def slide_logits(model: Segmenter, x: torch.Tensor, window: int, stride: int, num_classes: int) -> torch.Tensor:
    """(1, C, H, W) logits of one normalised image (1, 3, H, W) by sliding windows: each window
    padded to `window` if smaller, the overlapping logits averaged."""
    _, _, h, w = x.shape
    out = torch.zeros(1, num_classes, h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    rows = max(math.ceil((h - window) / stride), 0) + 1
    cols = max(math.ceil((w - window) / stride), 0) + 1
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * stride, max(h - window, 0)), min(c * stride, max(w - window, 0))
            y1, x1 = min(y0 + window, h), min(x0 + window, w)
            crop = F.pad(x[:, :, y0:y1, x0:x1], (0, window - (x1 - x0), 0, window - (y1 - y0)))
            logits, _ = model(crop)
            out[:, :, y0:y1, x0:x1] += logits[:, :, :y1 - y0, :x1 - x0].float()
            count[:, :, y0:y1, x0:x1] += 1
    return out / count


def confusion(pred: torch.Tensor, lab: torch.Tensor, n: int) -> torch.Tensor:
    keep = lab != IGNORE
    return torch.bincount(lab[keep] * n + pred[keep], minlength=n * n).reshape(n, n)


def iou_from_confusion(cm: np.ndarray) -> dict:
    """mIoU over the classes that occur (in labels or predictions), per-class IoU (None for
    a class with an empty union), pixel accuracy."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    return {"miou": 100 * float(np.mean(present)) if present else 0.0, "iou": iou,
            "aacc": 100 * float(tp.sum() / max(cm.sum(), 1))}


def evaluate(model: Segmenter, pairs, cfg: SegConfig, rank: int, world: int, device, amp, png: Path | None = None,
             progress: bool = False) -> dict:
    import torch.distributed as dist
    from beitfast.progress import progress_bar

    d, n = cfg.data, cfg.data.num_classes
    model.eval()
    cm = torch.zeros(n, n, dtype=torch.long, device=device)
    shown = []
    mine = list(range(rank, len(pairs), world))
    for i in progress_bar(mine, desc="eval", leave=False, disable=not progress):
        img, lab = read_pair(*pairs[i], d.reduce_zero_label)
        small, _ = resize_pair(img, None, rescale_size(*lab.shape, d.img_scale))
        x = to_tensor(small, d.mean, d.std)[None].to(device)
        with amp():
            logits = slide_logits(model, x, cfg.model.img_size, cfg.train.stride, n)
        logits = F.interpolate(logits, size=lab.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0]
        cm += confusion(pred, torch.from_numpy(lab).long().to(device), n)
        if png is not None and len(shown) < 4:
            shown.append((img, lab, pred.cpu().numpy()))
    if world > 1:
        dist.all_reduce(cm)
    model.train()
    res = iou_from_confusion(cm.cpu().numpy())
    res["images"] = len(pairs)
    if png is not None and rank == 0 and shown:
        draw_predictions(shown, n, png)
    return res


def draw_predictions(shown, n: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20", max(n, 2))

    def colour(lab):
        rgb = cmap(np.minimum(lab, n - 1))[..., :3]
        rgb[lab == IGNORE] = 0
        return rgb

    fig, axes = plt.subplots(len(shown), 3, figsize=(7, 2.3 * len(shown)), squeeze=False)
    for row, (img, lab, pred) in zip(axes, shown):
        for ax, pic, title in zip(row, (img, colour(lab), colour(pred)), ("image", "ground truth", "prediction")):
            ax.imshow(pic)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)


# ----------------------------------------------------------------------------- training
def build_model(cfg: SegConfig, world: int, rank: int, device: torch.device):
    """(segmenter on `device`, what load_pretrained said, AdamW over the layer-decay groups, the
    groups' lr scales, the GradScaler); the same initial weights on every rank."""
    o, t = cfg.optim, cfg.train
    torch.manual_seed(t.seed)
    model = Segmenter(cfg)
    loaded = load_pretrained(model.backbone.vit, cfg.model.pretrained) if cfg.model.pretrained else {"pretrained": None}
    if world > 1 and device.type == "cuda":  # the reference's SyncBN (batch 2 per GPU); gloo has none
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if t.self_check:  # timm's fused attention against its unfused path, on this device, before step 1
        for note in selfcheck.startup_timm(model.backbone.vit, device, t.precision, t.seed)[1]:
            if rank == 0:
                print(f"[segment] {note}")
    groups = seg_param_groups(model, o.weight_decay, o.layer_decay)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    return model, loaded, opt, [g["lr_scale"] for g in groups], scaler


def seg_loss(aux_weight: float):
    """The loss of a (logits, aux logits or None) segmenter: cross-entropy ignoring IGNORE,
    plus aux_weight x that of the auxiliary head."""
    def loss_of(net, x, y):
        logits, aux = net(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
        if aux is not None:
            loss = loss + aux_weight * F.cross_entropy(aux.float(), y, ignore_index=IGNORE)
        return loss
    return loss_of


def segment(cfg: SegConfig, world: int, rank: int, device: torch.device, out: Path) -> dict:
    d, o, t = cfg.data, cfg.optim, cfg.train
    pairs = list_ade20k(d.root, d.train_split)
    vpairs = list_ade20k(d.root, d.val_split)
    accum = accumulation(t.global_batch, d.batch_size, world)
    sampler = StepSampler(len(pairs), t.seed, d.batch_size, world, rank, accum)
    if sampler.steps_per_epoch < 1:
        raise ConfigError(f"{d.root}/images/{d.train_split} has {len(pairs)} images, fewer than one global batch")
    model, loaded, opt, scales, scaler = build_model(cfg, world, rank, device)
    ck, it, net = resume_run(out, CKPT_FORMAT, t.global_batch, model, opt, scaler, rank, world, device, "iter")
    best = ck.get("best") if ck is not None else None
    if rank == 0:
        print(f"[{PROG}] resumed from {out / 'ckpt.pt'} at iteration {it} of {t.iters}" if ck is not None else
              f"[{PROG}] {cfg.model.size} BEiT + {cfg.model.head} at {cfg.model.img_size} px, {d.num_classes} classes, "
              f"weights: {loaded['pretrained'] or 'random init'}; {len(pairs)} train / {len(vpairs)} val images, "
              f"{t.iters} iterations of {t.global_batch}")
    sampler.start_step = it
    ds = SegTrainStream(pairs, sampler, d, cfg.model.img_size, t.seed)
    amp = autocast(t.precision, device)
    kept = {"best": best, "last": None}

    def run_eval(at: int) -> tuple[dict, str]:
        ev = evaluate(model, vpairs, cfg, rank, world, device, amp, out / "predictions.png" if rank == 0 else None)
        kept["last"] = ev
        if kept["best"] is None or ev["miou"] > kept["best"]["miou"]:
            kept["best"] = {"miou": ev["miou"], "iter": at}
        return ({"kind": "eval", "step": at, "iter": at, "miou": round(ev["miou"], 3), "aacc": round(ev["aacc"], 3)},
                f"[{PROG}] iteration {at}: mIoU {ev['miou']:.2f}, pixel accuracy {ev['aacc']:.2f}% on "
                f"{ev['images']} images -> {out / 'predictions.png'}")

    it, preempted = train_steps(
        prog=PROG, unit="iteration", out=out, rank=rank, world=world, device=device, net=net, model=model, opt=opt,
        scaler=scaler, lr_scales=scales, lr_at=lambda i: poly_lr(i, o, t.iters),
        batches=train_batches(ds, d.batch_size, d.workers, device.type == "cuda"), accum=accum,
        loss_of=seg_loss(cfg.model.aux_weight), autocast_ctx=amp, global_batch=t.global_batch, start=it,
        total=t.iters, stop_at=t.stop_at, report_due=lambda i: i % cfg.log.every == 0,
        eval_due=lambda i: i % t.eval_every == 0, ckpt_due=lambda i: i % cfg.log.ckpt_every == 0,
        evaluate=run_eval, train_row=lambda i: {"iter": i}, ckpt_every_minutes=cfg.log.ckpt_every_minutes,
        checkpoint=lambda i, states: {"format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "scaler": scaler.state_dict(), "iter": i, "best": kept["best"],
                                      "rng_states": states, "world_size": world, "config": cfg.to_dict()},
        progress=cfg.log.progress)
    if preempted:
        return {"preempted_at": it}
    if it < t.iters:
        return {"stopped_at": it}
    last, best = kept["last"], kept["best"]
    if last is None:  # resumed at the very end: evaluate the final weights again
        last = evaluate(model, vpairs, cfg, rank, world, device, amp)
    res = {"miou": round(last["miou"], 3), "aacc": round(last["aacc"], 3),
           "iou": [None if v is None else round(100 * v, 2) for v in last["iou"]],
           "best_miou": round(best["miou"], 3), "iters": it, "head": cfg.model.head,
           "pretrained": cfg.model.pretrained or None, "out": str(out)}
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    return trainer_main(argv, __doc__, PROG, "seg_ade20k_base.yaml", SegConfig, segment)


if __name__ == "__main__":
    sys.exit(main())
