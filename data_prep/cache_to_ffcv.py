"""Write a token cache as an FFCV .beton, for `data.backend: ffcv`.

    python data_prep/cache_to_ffcv.py --cache CACHE [--out CACHE/ffcv/cache.beton] [--workers N]

One sample per cached image (sample id = cache index): its JPEG bytes, its K stored views
(crop box, flip, jitter) and their tokens (format: beitfast/data/ffcv_loader.py). FFCV's
DatasetWriter hangs for ever when one of its worker processes raises, so everything is
validated first (the cache's checksums and, per image, the sizes and bounds of what will be
written), and the writer runs in a child process watched for progress: if it fails or stops
writing for --stall-timeout seconds it is killed and the run fails. The file is written
under a temporary name and renamed when complete, with a sidecar .json naming the cache it
came from (the loader refuses a .beton of another cache).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast.data.cache import CacheError, TokenCache, atomic_write_json  # noqa: E402
from beitfast.data.ffcv_loader import (FORMAT, VIEW_FLOATS, ViewSampleField, beton_path,  # noqa: E402
                                       ffcv_unavailable, manifest_sha, view_table)


class CacheSamples:
    """What the writer's workers read: sample j -> (value for the `sample` field,). Opens the
    memory-mapped cache lazily in each worker."""

    def __init__(self, path: str):
        self.path, self._cache = path, None

    def _c(self) -> TokenCache:
        if self._cache is None:
            self._cache = TokenCache(self.path)
        return self._cache

    def __len__(self):
        return len(self._c())

    def __getstate__(self):
        return {"path": self.path, "_cache": None}

    def __getitem__(self, j):
        c = self._c()
        data, _, views, tokens = c.item(j)
        s, r = c.index[j]
        meta = c._shards[s]["meta"][r]
        return ((int(j), int(meta["height"]), int(meta["width"]), view_table(np.asarray(views)),
                 np.ascontiguousarray(tokens, np.uint16), np.asarray(data, np.uint8)),)


def validate(cache: TokenCache) -> int:
    """Check everything the writer will read; return the largest sample's size in bytes.
    Raises CacheError naming the image or file."""
    bad = cache.verify_checksums()
    if bad:
        raise CacheError(f"{cache.path}: checksums differ from the manifest for {bad[:5]}; the cache is damaged: "
                         f"rebuild it with data_prep/tokenize_imagenet.py")
    k = cache.views_per_image
    largest = 0
    for s, sh in enumerate(cache._shards):
        meta, views, tokens = sh["meta"], sh["views"], sh["tokens"]
        ok = np.flatnonzero(meta["ok"])
        if len(ok) == 0:
            continue
        m, v = meta[ok], views[ok]
        if tokens.dtype != np.uint16 or tokens.shape[1] != k or views.shape[1] != k:
            raise CacheError(f"{cache.path}: shard {s} has tokens {tokens.dtype} {tokens.shape} and views {views.shape}"
                             f"; expected uint16 (n, {k}, h*w) and (n, {k})")
        if (m["length"] == 0).any() or (m["offset"] + m["length"] > sh["images"].size).any():
            raise CacheError(f"{cache.path}: shard {s} has image byte ranges outside its images file")
        inside = ((v["y"] >= 0) & (v["x"] >= 0) & (v["h"] > 0) & (v["w"] > 0) & (v["y"] + v["h"] <= m["height"][:, None])
                  & (v["x"] + v["w"] <= m["width"][:, None]))
        if not inside.all():
            j = int(ok[np.flatnonzero(~inside.all(1))[0]])
            raise CacheError(f"{cache.path}: shard {s} row {j} has a view outside its image")
        largest = max(largest, int(m["length"].max()) + k * (VIEW_FLOATS * 4 + tokens.shape[2] * 2))
    return largest


def _write(cache_path: str, tmp: str, k: int, hw: int, page_size: int, workers: int) -> None:
    from ffcv.writer import DatasetWriter

    os.setpgrp()  # the writer and its worker processes in one group, killed together if they hang

    writer = DatasetWriter(tmp, {"sample": ViewSampleField(k, hw)}, page_size=page_size, num_workers=workers)
    writer.from_indexed_dataset(CacheSamples(cache_path), chunksize=64)


def _kill_group(child) -> None:
    import signal

    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="default: CACHE/ffcv/cache.beton (where the loader looks)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--stall-timeout", type=float, default=300.0,
                    help="fail when the writer writes nothing for this many seconds")
    a = ap.parse_args(argv)
    why = ffcv_unavailable()
    if why:
        print(f"cache_to_ffcv: {why}", file=sys.stderr)
        return 2
    try:
        cache = TokenCache(a.cache)
        largest = validate(cache)
    except CacheError as e:
        print(f"cache_to_ffcv: {e}", file=sys.stderr)
        return 2
    out = a.out or beton_path(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    page_size = 1 << max(21, (largest + 4096).bit_length())  # a sample must fit in one page (FFCV: >= 2 MiB)
    grid = cache.settings["tokenizer"]["grid"]
    args = (str(cache.path), str(tmp), cache.views_per_image, grid[0] * grid[1], page_size, a.workers)
    print(f"[ffcv] writing {len(cache)} images from {cache.path} to {out} ({a.workers} workers)")
    child = mp.get_context("spawn").Process(target=_write, args=args)
    t0, last_size, last_change = time.time(), -1, time.time()
    child.start()
    while child.is_alive():
        child.join(0.5)
        size = tmp.stat().st_size if tmp.exists() else 0
        if size != last_size:
            last_size, last_change = size, time.time()
        elif time.time() - last_change > a.stall_timeout:
            _kill_group(child)
            tmp.unlink(missing_ok=True)
            print(f"cache_to_ffcv: the FFCV writer wrote nothing for {a.stall_timeout:.0f} s (it hangs when a worker "
                  f"fails); killed it, nothing written", file=sys.stderr)
            return 1
    if child.exitcode != 0 or not tmp.exists():
        _kill_group(child)
        tmp.unlink(missing_ok=True)
        print(f"cache_to_ffcv: the FFCV writer failed (exit code {child.exitcode}); nothing written", file=sys.stderr)
        return 1
    os.replace(tmp, out)
    atomic_write_json(out.with_suffix(".json"), {"format": FORMAT, "cache": str(cache.path), "images": len(cache),
                                                 "cache_manifest_sha256": manifest_sha(cache),
                                                 "views": cache.views_per_image, "bytes": out.stat().st_size})
    print(f"[ffcv] {len(cache)} images, {out.stat().st_size / 2**20:.1f} MiB in {time.time() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
