"""Offline pre-tokenization: K sampled views per image, their tokens, in a token cache.

    python data_prep/tokenize_imagenet.py --data DIR --out CACHE --cfg base.yaml [--views K]
    torchrun --nproc_per_node=N data_prep/tokenize_imagenet.py ...   (same result)

For each image (ImageNet layout `DIR/train/<class>/*`, or `--file-list` lines
`relative/path label`; with `--unlabeled`, every image under DIR at any depth, or list lines
`relative/path`: label -1, and the manifest says `"labeled": false`), samples K views (crop box, flip, colour-jitter factors and order; a
pure function of seed, index and image size), renders each view's tokenizer input with the
shared view code (beitfast/data/views.py; DALI, GPU decoder when a GPU is present), runs the
tokenizer (tokenizer.precision: fp32 by default, as the reference) and stores the tokens
beside the view parameters and the image bytes. The format is described in
beitfast/data/cache.py and the README.

Shards are independent and deterministic: ranks take shards round-robin; every file is
written under a temporary name and renamed when complete, a shard's done-marker last and the
manifest after all shards. A re-run (after a crash or kill -9) skips finished shards and
produces byte-identical files. Undecodable images are listed with the reason and skipped;
the exit code is 1 when more than --max-reject of the images fail. SIGTERM or SIGUSR1 (a
preemption notice) finishes the shard in progress and exits 3, leaving <out>/PREEMPTED (its
"step" is the count of finished shards); a re-run goes on from there.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast import distributed  # noqa: E402
from beitfast.config import ConfigError, cli_config  # noqa: E402
from beitfast.data.cache import (MAGIC, META_DTYPE, VERSION, CacheError, atomic_write_json,  # noqa: E402
                                 diff_settings, expected_settings, read_done, write_shard)
from beitfast.data.images import UNLABELED, BadImage, list_imagefolder, list_unlabeled, prepare_for_cache  # noqa: E402
from beitfast.data.loader import thread_plan  # noqa: E402
from beitfast.data.views import VIEW_DTYPE, AugSpec, ViewRenderer, contrast_pivots, sample_views  # noqa: E402
from beitfast.tokenizers import build_tokenizer  # noqa: E402


def read_file_list(root: Path, path: Path, unlabeled: bool = False) -> tuple[list[str], np.ndarray, list[str]]:
    """Lines 'relative/path label', or with `unlabeled` lines 'relative/path' (a path may hold
    spaces then; every label is -1). A line that does not fit is an error naming it."""
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if unlabeled:
            paths.append(line.strip())
            labels.append(UNLABELED)
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line!r} (a list without labels: "
                             f"add --unlabeled)")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"{path}: no images listed")
    return paths, np.asarray(labels, np.int64), []


def prepare(root: Path, rel: str, max_side: int):
    """(bytes, h, w, action) or (None, 0, 0, reason) for one source image."""
    try:
        data = (root / rel).read_bytes()
        return prepare_for_cache(data, rel, max_side)
    except BadImage as e:
        return None, 0, 0, e.reason
    except OSError as e:
        return None, 0, 0, f"cannot read ({type(e).__name__}: {e})"


def tokenize_shard(s: int, a, paths, labels, settings, renderer, tokenizer, pool, bar) -> dict:
    lo, hi = s * a.shard_size, min(len(paths), (s + 1) * a.shard_size)
    k = settings["views"]
    aug = AugSpec(**{kk: tuple(v) if isinstance(v, list) else v for kk, v in settings["aug"].items()})
    n = hi - lo
    meta = np.zeros(n, META_DTYPE)
    views = np.zeros((n, k), VIEW_DTYPE)
    hw = tokenizer.grid[0] * tokenizer.grid[1]
    tokens = np.zeros((n, k, hw), np.uint16)
    blobs, rejected, todo = [], [], []
    def prepare_with_views(i):
        """(bytes, h, w, action, views) of source image i; views with their contrast pivots,
        computed on the whole image as the reference's jitter sees it."""
        blob, h, w, action = prepare(a.data, paths[i], settings["max_side"])
        if blob is None:
            return blob, h, w, action, None
        vv = sample_views(settings["seed"], i, h, w, k, aug)
        vv["pivot"] = contrast_pivots(Image.open(io.BytesIO(blob)).convert("RGB"), vv)
        return blob, h, w, action, vv

    for r, (blob, h, w, action, vv) in enumerate(pool.map(prepare_with_views, range(lo, hi))):
        i = lo + r
        meta[r]["label"] = labels[i]
        if blob is None:
            blobs.append(b"")
            rejected.append({"index": i, "path": paths[i], "reason": action})
            continue
        blobs.append(blob)
        meta[r]["height"], meta[r]["width"], meta[r]["ok"] = h, w, 1
        views[r] = vv
        todo += [(r, v) for v in range(k)]
    for c in range(0, len(todo), renderer.batch_size):
        chunk = todo[c:c + renderer.batch_size]
        jpegs = [np.frombuffer(blobs[r], np.uint8) for r, _ in chunk]
        vv = np.array([views[r, v] for r, v in chunk], VIEW_DTYPE)
        ids = tokenizer.encode(renderer.render(jpegs, vv))  # uint8 views in, (b, h, w) tokens out
        ids = ids.reshape(len(chunk), hw).to("cpu", torch.int64).numpy().astype(np.uint16)
        for (r, v), t in zip(chunk, ids):
            tokens[r, v] = t
    bar.update(n)
    return write_shard(a.out, s, blobs, meta, views, tokens, rejected)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset root (ImageNet layout)")
    ap.add_argument("--out", type=Path, required=True, help="cache directory")
    ap.add_argument("--cfg", default="base.yaml")
    ap.add_argument("--views", type=int, default=None, help="K views per image (default: data.views)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--file-list", type=Path, default=None, help="lines 'relative/path label' instead of folders "
                    "(with --unlabeled: lines 'relative/path')")
    ap.add_argument("--unlabeled", action="store_true", help="your own images without labels: every image under "
                    "--data, recursively, any format Pillow reads (or the --file-list paths); labels -1")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--max-reject", type=float, default=0.01, help="fail (exit 1) above this fraction of bad images")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--render-batch", type=int, default=256)
    ap.add_argument("--no-progress", action="store_true")
    a, rest = ap.parse_known_args(argv)
    try:
        cfg = cli_config(["--cfg", a.cfg, *rest, *([f"data.views={a.views}"] if a.views else [])])
        if a.file_list:
            paths, labels, classes = read_file_list(a.data, a.file_list, a.unlabeled)
        elif a.unlabeled:
            paths, labels, classes = list_unlabeled(a.data)
        else:
            paths, labels, classes = list_imagefolder(a.data, a.split)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"tokenize_imagenet: error: {e}", file=sys.stderr)
        return 2

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")  # only barriers and small objects travel
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        tokenizer = build_tokenizer(cfg.tokenizer, cfg.data.tokenizer_img_size, device)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"tokenize_imagenet: tokenizer: {e}", file=sys.stderr)
        return 2
    settings = expected_settings(cfg, tokenizer.identity)
    n_shards = (len(paths) + a.shard_size - 1) // a.shard_size
    listing = hashlib.sha256("".join(f"{p}\t{l}\n" for p, l in zip(paths, labels)).encode()).hexdigest()
    plan = {"magic": MAGIC, "version": VERSION, "settings": settings, "images": len(paths), "shard_size": a.shard_size,
            "shards": n_shards, "listing_sha256": listing, "classes": classes,
            **({"labeled": False} if a.unlabeled else {})}  # absent: labelled (older caches stay valid)

    # --- plan: what this cache is; a resumed run must match it
    a.out.mkdir(parents=True, exist_ok=True)
    plan_path = a.out / "plan.json"
    if rank == 0:
        if plan_path.exists():
            old = json.loads(plan_path.read_text())
            d = diff_settings(old, plan)
            if d:
                print(f"tokenize_imagenet: {a.out} holds a cache started with other settings:\n  " + "\n  ".join(d) +
                      f"\nremove {a.out} or choose another --out", file=sys.stderr)
                return 2
        else:
            atomic_write_json(plan_path, plan)
    if world > 1:
        ok = [plan_path.exists()]
        dist.broadcast_object_list(ok)
        if not ok[0]:
            return 2

    # --- shards
    mine = [s for s in range(rank, n_shards, world)]
    todo = [s for s in mine if read_done(a.out, s) is None]
    from beitfast.progress import progress_bar

    bar = progress_bar(total=sum(min(len(paths), (s + 1) * a.shard_size) - s * a.shard_size for s in mine),
               desc=f"tokenize[{rank}]" if world > 1 else "tokenize", unit="img", disable=a.no_progress)
    bar.update(bar.total - sum(min(len(paths), (s + 1) * a.shard_size) - s * a.shard_size for s in todo))
    t0, done_imgs = time.time(), 0
    threads, _ = thread_plan(cfg.data)  # this node's cores divided among its ranks unless set
    from beitfast import preempt

    if rank == 0:
        preempt.clear(a.out)
    # ranks hold different numbers of shards, so each stops on its own after the shard it is in;
    # they agree once, after the loop
    pre = preempt.Preemption("tokenize", 1, device, verbose=True)
    if todo:
        renderer = ViewRenderer(cfg.data.tokenizer_img_size, "lanczos", a.render_batch,
                                "gpu" if cuda else "cpu", threads, device.index or 0)
        with ThreadPoolExecutor(threads) as pool:
            for s in todo:
                d = tokenize_shard(s, a, paths, labels, settings, renderer, tokenizer, pool, bar)
                done_imgs += d["images"]
                bar.set_postfix(views_per_s=f"{done_imgs * settings['views'] / (time.time() - t0):.0f}")
                if pre.requested:
                    break
    bar.close()
    pre.close()
    stopped = torch.tensor([float(pre.requested is not None)])
    if world > 1:
        dist.all_reduce(stopped, op=dist.ReduceOp.MAX)  # gloo: every rank, once
    if stopped.item():
        if rank == 0:
            preempt.mark(a.out, sum(read_done(a.out, s) is not None for s in range(n_shards)), pre.requested)
            print(f"[tokenize] stopped on a signal after finishing its shard; {a.out} keeps every finished shard; "
                  f"run the same command again to resume (exit {preempt.EXIT_PREEMPTED})")
        distributed.shutdown()
        return preempt.EXIT_PREEMPTED

    # --- manifest (rank 0, after every shard is done)
    code = 0
    if rank == 0:
        dones = [read_done(a.out, s) for s in range(n_shards)]
        missing = [s for s, d in enumerate(dones) if d is None]
        if missing:
            print(f"tokenize_imagenet: shards {missing[:10]} are not complete; re-run to finish", file=sys.stderr)
            distributed.shutdown(clean=False)
            return 1
        files = {name: h for d in dones for name, h in d["files"].items()}
        rejected = [r for d in dones for r in d["rejected"]]
        ok = sum(d["ok"] for d in dones)
        manifest = {**plan, "counts": {"images": len(paths), "ok": ok, "rejected": len(rejected), "shards": n_shards,
                                       "views": ok * settings["views"], "grid": list(tokenizer.grid)},
                    "files": files, "rejected": rejected}
        for tmp in a.out.glob("*.tmp"):
            tmp.unlink()
        atomic_write_json(a.out / "manifest.json", manifest)
        frac = len(rejected) / max(1, len(paths))
        for r in rejected[:20]:
            print(f"[tokenize] rejected {r['path']}: {r['reason']}")
        print(f"[tokenize] {ok} images x {settings['views']} views tokenized, {len(rejected)} rejected "
              f"({100 * frac:.2f}%), {n_shards} shards -> {a.out}")
        if frac > a.max_reject:
            print(f"tokenize_imagenet: {100 * frac:.2f}% of images failed, above --max-reject "
                  f"{100 * a.max_reject:.2f}%", file=sys.stderr)
            code = 1
    distributed.shutdown()
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CacheError as e:
        print(f"tokenize_imagenet: {e}", file=sys.stderr)
        sys.exit(2)
