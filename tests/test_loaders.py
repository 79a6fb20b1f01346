"""Every loader backend yields the one batch contract, for the same stored views: checked
against the cache itself and against the reference renderer, across backends, ranks and
resume points. DALI, FFCV and the file system are the real ones (CPU pipelines here)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.config import load_config
from beitfast.data.cache import TokenCache
from beitfast.data.loader import build_loader, thread_plan
from beitfast.data.sampler import StepSampler
from beitfast.data.views import pick_view, reference_view
from beitfast.masking import MaskGenerator, MaskSpec
from tests.conftest import ffcv_skip_reason

BACKENDS = ["dali", "reference", "ffcv"]


@pytest.fixture(params=BACKENDS)
def backend_cache(request, cache):
    """(backend, cache); the FFCV case writes the cache's .beton first (skipped without FFCV)."""
    if request.param == "ffcv":
        return "ffcv", request.getfixturevalue("ffcv_cache")
    return request.param, cache


def _cfg(cache, backend, *extra):
    path, over = cache
    return load_config("tiny", [*over, f"data.cache={path}", f"data.backend={backend}", "data.batch_size=8",
                                "data.workers=0", *extra])


def _take(loader, start, n, **kw):
    """n micro-batches from `start`, cloned (backends reuse their buffers)."""
    s = loader.stream(start)
    try:
        return [{k: v.clone() for k, v in next(s).items()} for _ in range(n)]
    finally:
        s.close()


def test_batch_contract_and_the_stored_views(backend_cache):
    """Shapes, dtypes, tokens and masks of exactly the picked view, and pixels: each image is
    compared with the reference renderer's image of the SAME stored view (small difference)
    and of the image's OTHER stored view (large difference), so a wrong box, flip or view
    fails, not only a wrong mean. The batch is from epoch 1, so a backend that does not see
    the epoch (picks epoch 0's views or masks) fails too."""
    backend, cache = backend_cache
    cfg = _cfg(cache, backend)
    c = TokenCache(cache[0])
    loader = build_loader(cfg, c)
    spe = loader.steps_per_epoch
    (b,) = _take(loader, spe + 1, 1)
    assert b["images"].shape == (8, 3, 64, 64) and b["images"].dtype == torch.float32
    assert b["tokens"].shape == (8, 8, 8) and b["tokens"].dtype == torch.int64
    assert b["mask"].shape == (8, 8, 8) and b["mask"].dtype == torch.bool and b["index"].dtype == torch.int64
    sampler = StepSampler(len(c), cfg.train.seed, 8)
    idx = b["index"].numpy()
    np.testing.assert_array_equal(idx, sampler.batch_indices(1, 1))
    which = pick_view(cfg.train.seed, 1, idx, 2)
    assert (which != pick_view(cfg.train.seed, 0, idx, 2)).any()  # epoch 1 picks other views
    want = np.stack([c.item(int(j))[3][v] for j, v in zip(idx, which)]).reshape(8, 8, 8)
    np.testing.assert_array_equal(b["tokens"].numpy(), want)
    np.testing.assert_array_equal(b["mask"].numpy(), MaskGenerator(MaskSpec.from_config(cfg.mask, 8), 0)(idx, 1))
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    pixels = (b["images"].float() * std + mean) * 255
    same, other = [], []
    for img, j, v in zip(pixels, idx, which):
        data, _, views, _ = c.item(int(j))
        pil = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        for k, out in ((v, same), (1 - v, other)):
            ref = torch.from_numpy(np.array(reference_view(pil, views[k], 64, "cubic"))).permute(2, 0, 1).float()
            out.append(float((img - ref).abs().mean()))
    assert max(same) < 1.0, same  # 0..255 units: decoder and resampler differences only
    assert all(o > max(5 * s, 3.0) for o, s in zip(other, same)), (same, other)


def test_tokenizer_view_retokenizes_to_the_cached_tokens(backend_cache):
    """The tokenizer view each backend renders at training time, run through the tokenizer,
    gives the cached tokens: at least 99.5% over an epoch (100% for DALI, the renderer the
    cache was made with; the others differ by the resampler)."""
    from beitfast.tokenizers import build_tokenizer

    backend, cache = backend_cache
    cfg = _cfg(cache, backend)
    c = TokenCache(cache[0])
    tok = build_tokenizer(cfg.tokenizer, 32)
    loader = build_loader(cfg, c, view="tokenizer")
    batches = _take(loader, 0, loader.steps_per_epoch)
    assert batches[0]["images"].dtype == torch.uint8 and batches[0]["images"].shape == (8, 3, 32, 32)
    agree = np.mean([float((tok.encode(b["images"]) == b["tokens"]).float().mean()) for b in batches])
    assert agree >= (1.0 if backend == "dali" else 0.995), agree


def test_backends_agree_on_everything_but_rounding(cache, ffcv_cache_or_none):
    """Across backends: the same indices, tokens and masks batch for batch, and images within
    a small mean absolute difference of the reference's (reported by bench_loader.py)."""
    runs = {}
    for backend in BACKENDS:
        if backend == "ffcv" and ffcv_cache_or_none is None:
            continue
        runs[backend] = _take(build_loader(_cfg(cache, backend), TokenCache(cache[0])), 2, 3)
    ref = runs.pop("reference")
    assert runs
    for name, batches in runs.items():
        for a, r in zip(batches, ref):
            for k in ("index", "tokens", "mask"):
                assert torch.equal(a[k], r[k]), (name, k)
            assert float((a["images"] - r["images"]).abs().mean()) * 255 * 0.226 < 1.0, name


@pytest.fixture
def ffcv_cache_or_none(request):
    return None if ffcv_skip_reason() else request.getfixturevalue("ffcv_cache")


def test_ranks_shard_each_epoch(backend_cache):
    """Two ranks: each image at most once per epoch, the ranks disjoint, and together all
    images but the remainder of the last global batch."""
    backend, cache = backend_cache
    cfg = _cfg(cache, backend)
    c = TokenCache(cache[0])
    seen = []
    for rank in (0, 1):
        loader = build_loader(cfg, c, rank=rank, world=2)
        seen.append(np.concatenate([b["index"].numpy() for b in _take(loader, 0, loader.steps_per_epoch)]))
    assert len(set(seen[0])) == len(seen[0]) and len(set(seen[1])) == len(seen[1])
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == len(c) // 16 * 16


def test_resume_mid_epoch_sees_the_same_samples(backend_cache):
    """A stream started at optimizer step s (mid-epoch, accumulating 2 micro-batches) yields
    exactly the tail of the stream started at 0, and runs on into the next epoch."""
    backend, cache = backend_cache
    cfg = _cfg(cache, backend)
    c = TokenCache(cache[0])
    loader = build_loader(cfg, c, accum=2)
    spe = loader.steps_per_epoch
    start = spe - 2  # the last two steps of epoch 0, then epoch 1
    full = _take(loader, 0, 2 * spe + 2)
    tail = _take(loader, start, 6)
    for a, b in zip(full[start * 2:], tail):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(full[0]["index"], full[2 * spe]["index"])  # epoch 1 has its own order


def test_a_batch_keeps_its_values_while_later_batches_are_made(backend_cache):
    """Safe by construction: a yielded batch, NOT cloned, still holds the same values after the
    stream has produced data.prefetch + 2 more batches (a backend handing out views of buffers
    it reuses, as DALI's dynamic executor and FFCV's queue do, fails this)."""
    backend, cache = backend_cache
    cfg = _cfg(cache, backend, "data.prefetch=2")
    s = build_loader(cfg, TokenCache(cache[0])).stream(0)
    try:
        first = next(s)
        kept = {k: v.clone() for k, v in first.items()}
        later = [next(s) for _ in range(cfg.data.prefetch + 2)]
        for k in kept:
            assert torch.equal(first[k], kept[k]), f"{backend}: batch 0's {k} changed while later batches were made"
        assert not torch.equal(later[-1]["index"], kept["index"])
    finally:
        s.close()


def test_threads_are_divided_among_the_ranks_of_a_node():
    class D:
        num_threads, workers = 0, -1

    assert thread_plan(D, local_world=8, cores=16) == (2, 2)
    assert thread_plan(D, local_world=3, cores=2) == (1, 1)
    assert thread_plan(D, local_world=1, cores=16) == (16, 16)
    D.num_threads, D.workers = 4, 0
    assert thread_plan(D, local_world=8, cores=16) == (4, 0)  # explicit values are per rank, as given


def test_ffcv_leaves_numbas_types_alone(ffcv_cache):
    """FFCV 1.0.2 sets `mutable = False` on Numba's shared uint8[::1] type; unrepaired, every
    later compile for uint8 arrays failed (DALI's mask operator after an FFCV loader). The
    loader repairs it: the type stays mutable, and a DALI loader still builds afterwards."""
    import numba as nb

    _take(build_loader(_cfg(ffcv_cache, "ffcv"), TokenCache(ffcv_cache[0])), 0, 1)
    assert nb.uint8[::1].mutable
    (b,) = _take(build_loader(_cfg(ffcv_cache, "dali"), TokenCache(ffcv_cache[0])), 0, 1)
    assert b["mask"].any()


def test_cache_to_ffcv_refuses_a_damaged_cache_quickly(cache, tmp_path):
    """Validation comes before FFCV's writer (which hangs when a worker raises): a tampered
    cache is refused naming the file, and nothing is written."""
    import shutil

    from data_prep.cache_to_ffcv import main as to_ffcv

    why = ffcv_skip_reason()
    if why:
        pytest.skip(why)
    bad = tmp_path / "cache"
    shutil.copytree(cache[0], bad, ignore=shutil.ignore_patterns("ffcv"))
    tok = next(bad.glob("tokens-*.npy"))
    data = bytearray(tok.read_bytes())
    data[-1] ^= 0xFF
    tok.write_bytes(bytes(data))
    assert to_ffcv(["--cache", str(bad), "--out", str(tmp_path / "x.beton")]) == 2
    assert not (tmp_path / "x.beton").exists() and not (tmp_path / "x.beton.tmp").exists()


def test_ffcv_loader_refuses_a_beton_of_another_cache(ffcv_cache, tmp_path):
    import shutil

    from beitfast.data.cache import CacheError

    other = tmp_path / "cache"
    shutil.copytree(ffcv_cache[0], other)
    mf = other / "manifest.json"
    mf.write_text(mf.read_text().replace('"ok"', '"ok" ', 1))  # same cache content, another manifest
    with pytest.raises(CacheError, match="another cache or version.*cache_to_ffcv.py"):
        build_loader(_cfg((other, ffcv_cache[1]), "ffcv"), TokenCache(other))


def test_online_targets_render_a_fresh_view_each_epoch_and_tokenize_it(cache, toy_root):
    """data.targets=online: image j in epoch e is view e of sample_views(seed, j) rendered by
    the reference renderer, and its tokens are the tokenizer's encoding of the tokenizer view of
    that same crop; epoch 1 shows other views than epoch 0."""
    from beitfast.data.images import decode_rgb, list_imagefolder
    from beitfast.data.views import AugSpec, reference_views, sample_views
    from beitfast.tokenizers import build_tokenizer

    cfg = _cfg(cache, "reference", "data.targets=online", f"data.root={toy_root}")
    files, _, _ = list_imagefolder(toy_root, "train")
    tok = build_tokenizer(cfg.tokenizer, 32)
    loader = build_loader(cfg, None, tokenizer=tok)
    spe = loader.steps_per_epoch
    (b,) = _take(loader, spe, 1)  # the first batch of epoch 1
    (t,) = _take(build_loader(cfg, None, tokenizer=tok, view="tokenizer"), spe, 1)
    assert torch.equal(b["index"], t["index"]) and torch.equal(b["tokens"], t["tokens"])
    np.testing.assert_array_equal(b["tokens"].numpy(), tok.encode(t["images"]).numpy())
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    aug = AugSpec.from_config(cfg.data)
    moved = 0
    for img, small, j in zip(b["images"], t["images"], b["index"].tolist()):
        try:
            arr = decode_rgb((toy_root / files[j]).read_bytes())
        except Exception:
            continue  # a corrupt toy file: the loader used the next one
        v0, v1 = sample_views(cfg.train.seed, j, *arr.shape[:2], 2, aug)
        vit, tk = reference_views(Image.fromarray(arr), v1, [(64, "cubic"), (32, "lanczos")])
        want = (torch.from_numpy(np.array(vit)).permute(2, 0, 1).float() / 255 - mean) / std
        assert torch.allclose(img, want, atol=1e-5)
        assert torch.equal(small, torch.from_numpy(np.array(tk)).permute(2, 0, 1))
        moved += (v0["y"], v0["x"], v0["h"], v0["w"]) != (v1["y"], v1["x"], v1["h"], v1["w"])
    assert moved >= 6
