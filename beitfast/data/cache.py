"""The token cache: on-disk format, shard writer and memory-mapped reader.

A cache directory (written by data_prep/tokenize_imagenet.py) holds, for shard i (a
contiguous run of `shard_size` images of the source list, in its order):

    images-0000i.bin    the image bytes, concatenated (upright RGB JPEGs; odd inputs re-encoded)
    meta-0000i.npy      META_DTYPE (n,): offset, length, label, height, width, ok
    views-0000i.npy     VIEW_DTYPE (n, K): crop box, flip, jitter factors, order and contrast pivot per view
    tokens-0000i.npy    uint16 (n, K, h*w): the tokenizer's ids for each view
    shard-0000i.json    written last: counts, sha256 of the four files, rejected files

and, once every shard is done, `manifest.json` (format, version, settings, counts, per-file
sha256, rejected files with reasons). `plan.json`, written first, records what the run set out
to do so that a resumed run can refuse different settings. All .npy files open with
`np.load(mmap_mode="r")`; a rejected image (ok = 0) has no bytes and zero views and tokens.
Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

MAGIC = "beitfast-token-cache"
VERSION = 2  # 2: views carry the contrast pivot; ROI-decoded views, jitter rounded as Pillow
META_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("label", "<i4"), ("height", "<i4"),
                       ("width", "<i4"), ("ok", "u1")])


class CacheError(ValueError):
    """A cache that is missing, damaged or built with other settings; says what to do."""


def shard_files(i: int) -> dict[str, str]:
    return {"images": f"images-{i:05d}.bin", "meta": f"meta-{i:05d}.npy", "views": f"views-{i:05d}.npy",
            "tokens": f"tokens-{i:05d}.npy", "done": f"shard-{i:05d}.json"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard(out: Path, i: int, blobs: list[bytes], meta: np.ndarray, views: np.ndarray, tokens: np.ndarray,
                rejected: list[dict]) -> dict:
    """Write shard i's four data files, then its done-marker (the commit point)."""
    names = shard_files(i)
    offsets = np.cumsum([0] + [len(b) for b in blobs])[:-1]
    meta = meta.copy()
    meta["offset"], meta["length"] = offsets, [len(b) for b in blobs]
    payload = {"images": b"".join(blobs), "meta": _npy_bytes(meta), "views": _npy_bytes(views),
               "tokens": _npy_bytes(tokens)}
    sums = {}
    for key, data in payload.items():
        atomic_write_bytes(out / names[key], data)
        sums[names[key]] = hashlib.sha256(data).hexdigest()
    done = {"shard": i, "images": int(len(meta)), "ok": int(meta["ok"].sum()), "files": sums,
            "sizes": {names[k]: len(v) for k, v in payload.items()}, "rejected": rejected}
    atomic_write_json(out / names["done"], done)
    return done


def read_done(out: Path, i: int) -> dict | None:
    """Shard i's done-marker if the shard is complete (marker present, files of the recorded
    sizes), else None."""
    p = out / shard_files(i)["done"]
    if not p.exists():
        return None
    try:
        done = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    for name, size in done["sizes"].items():
        f = out / name
        if not f.exists() or f.stat().st_size != size:
            return None
    return done


def diff_settings(have: dict, want: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts."""
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k, "<absent>"), want.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: cache has {a!r}, config wants {b!r}")
    return out


class TokenCache:
    """Read-only, memory-mapped view of a complete cache. Index `j` runs over the images
    that were tokenized (rejected ones are skipped); `item(j)` -> (jpeg bytes, label,
    views (K,), tokens (K, h*w))."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            hint = " (a tokenization run is incomplete: re-run tokenize_imagenet.py to finish it)" \
                if (self.path / "plan.json").exists() else ""
            raise CacheError(f"{self.path} is not a complete token cache: no manifest.json{hint}")
        m = json.loads(mf.read_text())
        if m.get("magic") != MAGIC:
            raise CacheError(f"{mf}: not a beitfast token cache (magic {m.get('magic')!r})")
        if m.get("version") != VERSION:
            raise CacheError(f"{mf}: cache format version {m.get('version')}, this code reads version {VERSION}; "
                             f"rebuild it with data_prep/tokenize_imagenet.py")
        self.manifest = m
        self.labeled = m.get("labeled", True)  # tokenize_imagenet.py --unlabeled: every label is -1
        self.settings = m["settings"]
        self.views_per_image = m["settings"]["views"]
        self._shards = []
        for i in range(m["counts"]["shards"]):
            n = shard_files(i)
            meta = np.load(self.path / n["meta"], mmap_mode="r")
            self._shards.append({
                "images": np.memmap(self.path / n["images"], dtype=np.uint8, mode="r")
                if (self.path / n["images"]).stat().st_size else np.zeros(0, np.uint8),
                "meta": meta,
                "views": np.load(self.path / n["views"], mmap_mode="r"),
                "tokens": np.load(self.path / n["tokens"], mmap_mode="r"),
            })
        # (shard, row) of every tokenized image, in source order; vectorised per shard
        ok_rows = [np.flatnonzero(sh["meta"]["ok"]) for sh in self._shards]
        self.index = np.concatenate([np.stack([np.full(len(r), s), r], 1) for s, r in enumerate(ok_rows)]
                                    + [np.zeros((0, 2), np.int64)]).astype(np.int64)
        self.labels = np.concatenate([np.asarray(sh["meta"]["label"][r], np.int64)
                                      for sh, r in zip(self._shards, ok_rows)] + [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return len(self.index)

    def check(self, want: dict) -> None:
        """Raise CacheError naming every setting that differs from `want`."""
        self._refuse(diff_settings(self.settings, want))

    def check_config(self, cfg, tokenizer: dict | None = None) -> None:
        """Every way this cache can disagree with a training config, checked in one place: the
        settings it was built with (views, seed, augmentation, tokenizer input size, max side,
        renderer), the tokenizer that made its tokens (kind, weights checksum, sizes, precision;
        only when `tokenizer`, the configured tokenizer's identity, is given), its vocabulary
        against model.vocab_size and its token grid against the model's patch grid. Raises one
        CacheError naming each difference."""
        tok = self.settings["tokenizer"]
        problems = diff_settings(self.settings, expected_settings(cfg, tokenizer if tokenizer is not None else tok))
        if tokenizer is not None and tokenizer != tok:
            problems.append(f"(the configured tokenizer is tokenizer.kind={cfg.tokenizer.kind} "
                            f"tokenizer.path={cfg.tokenizer.path} tokenizer.precision={cfg.tokenizer.precision})")
        if tok["vocab_size"] != cfg.model.vocab_size:
            problems.append(f"tokenizer vocabulary: cache has {tok['vocab_size']}, model.vocab_size is "
                            f"{cfg.model.vocab_size}")
        grid = cfg.model.img_size // cfg.model.patch_size
        if list(tok["grid"]) != [grid, grid]:
            problems.append(f"token grid: cache has {tok['grid']}, the model has {grid}x{grid} patches "
                            f"(model.img_size / model.patch_size)")
        self._refuse(problems)

    def _refuse(self, problems: list[str]) -> None:
        if problems:
            raise CacheError(f"{self.path} was built with other settings:\n  " + "\n  ".join(problems) +
                             "\nrebuild it (data_prep/tokenize_imagenet.py) or change the config to match")

    def item(self, j: int):
        s, r = self.index[j]
        sh = self._shards[s]
        m = sh["meta"][r]
        data = sh["images"][int(m["offset"]): int(m["offset"]) + int(m["length"])]
        return data, int(m["label"]), sh["views"][r], sh["tokens"][r]

    def locate(self, j: int) -> str:
        """Where image j's bytes are on disk, for error messages."""
        s, r = self.index[j]
        m = self._shards[s]["meta"][r]
        return f"{shard_files(int(s))['images']} bytes {int(m['offset'])}..{int(m['offset']) + int(m['length'])}"

    def verify_checksums(self) -> list[str]:
        """Files whose sha256 differs from the manifest's (empty when all is well)."""
        return [name for name, want in self.manifest["files"].items() if sha256_file(self.path / name) != want]


RENDER_VERSION = "dali-roi-decode+resize-lanczos3-antialias+jitter-pivot-floor/2"


def expected_settings(cfg, tokenizer_identity: dict, views: int | None = None) -> dict:
    """The settings a cache built from `cfg` records and a reader requires."""
    from beitfast.data.views import AugSpec

    return {"views": int(views if views is not None else cfg.data.views), "seed": int(cfg.train.seed),
            "aug": AugSpec.from_config(cfg.data).to_dict(), "tokenizer": tokenizer_identity,
            "tokenizer_img_size": int(cfg.data.tokenizer_img_size), "max_side": int(cfg.data.max_side),
            "render": RENDER_VERSION}
