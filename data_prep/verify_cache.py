"""Check a token cache: checksums, counts, token range, and re-tokenize a sample of views.

    python data_prep/verify_cache.py --cache CACHE --cfg base.yaml [--sample 256] [overrides]

Re-renders a random sample of stored views with the shared view code and re-runs the
tokenizer of the config; reports the fraction of tokens identical to the stored ones (at
least 99.5% is expected on the device that built the cache). The last line is one JSON
object with `images`, `views`, `rejected`, `token_agreement` and the individual checks; the
exit code is 0 only when every check passes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast.config import ConfigError, cli_config  # noqa: E402
from beitfast.data.cache import CacheError, TokenCache, expected_settings  # noqa: E402
from beitfast.data.loader import thread_plan  # noqa: E402
from beitfast.data.views import VIEW_DTYPE, ViewRenderer  # noqa: E402
from beitfast.tokenizers import build_tokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--cfg", default="base.yaml")
    ap.add_argument("--sample", type=int, default=256, help="views to re-render and re-tokenize")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-agreement", type=float, default=0.995)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a, rest = ap.parse_known_args(argv)
    try:
        cache = TokenCache(a.cache)
        cfg = cli_config(["--cfg", a.cfg, *rest, f"data.views={cache.views_per_image}"])
        cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
        tokenizer = build_tokenizer(cfg.tokenizer, cfg.data.tokenizer_img_size, "cuda" if cuda else "cpu")
        cache.check(expected_settings(cfg, tokenizer.identity))
    except (CacheError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"verify_cache: {e}", file=sys.stderr)
        return 2
    m = cache.manifest
    k, vocab = cache.views_per_image, tokenizer.vocab_size
    checks = {"checksums_ok": not cache.verify_checksums()}
    checks["counts_ok"] = (len(cache) == m["counts"]["ok"] and m["counts"]["ok"] + m["counts"]["rejected"] ==
                           m["counts"]["images"] and len(m["rejected"]) == m["counts"]["rejected"])
    in_range = in_bounds = True
    for sh in cache._shards:  # vectorised per shard: ImageNet has 1.28M images
        ok = sh["meta"]["ok"] == 1
        toks = sh["tokens"]
        in_range &= toks.shape[1:] == (k, tokenizer.grid[0] * tokenizer.grid[1]) and bool(
            not ok.any() or toks[ok].max() < vocab)
        v, meta = sh["views"][ok], sh["meta"][ok]
        in_bounds &= bool(((v["y"] >= 0) & (v["x"] >= 0) & (v["h"] > 0) & (v["w"] > 0) &
                           (v["y"] + v["h"] <= meta["height"][:, None]) &
                           (v["x"] + v["w"] <= meta["width"][:, None])).all())
    checks["tokens_in_range"], checks["views_in_bounds"] = in_range, in_bounds

    rng = np.random.default_rng(a.seed)
    n = min(a.sample, len(cache) * k)
    picks = rng.choice(len(cache) * k, size=n, replace=False) if n else np.zeros(0, np.int64)
    renderer = ViewRenderer(cfg.data.tokenizer_img_size, "lanczos", min(256, max(1, n)), "gpu" if cuda else "cpu",
                            thread_plan(cfg.data)[0])
    agree = total = 0
    for c in range(0, n, renderer.batch_size):
        items = [cache.item(int(p) // k) + (int(p) % k,) for p in picks[c:c + renderer.batch_size]]
        jpegs = [np.asarray(it[0]) for it in items]
        views = np.array([it[2][it[4]] for it in items], VIEW_DTYPE)
        stored = torch.from_numpy(np.stack([it[3][it[4]] for it in items]).astype(np.int64))
        fresh = tokenizer.encode(renderer.render(jpegs, views)).reshape(len(items), -1).cpu()
        agree += int((fresh == stored).sum())
        total += stored.numel()
    agreement = agree / total if total else 1.0
    checks["agreement_ok"] = agreement >= a.min_agreement
    result = {"cache": str(a.cache), "images": len(cache), "views": len(cache) * k, "rejected": m["counts"]["rejected"],
              "sampled_views": n, "token_agreement": round(agreement, 6), **checks}
    print(f"[verify] {len(cache)} images, {len(cache) * k} views, {m['counts']['rejected']} rejected; "
          f"token agreement {100 * agreement:.2f}% on {n} re-rendered views; "
          + ", ".join(f"{c}={v}" for c, v in checks.items()))
    print(json.dumps(result))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
