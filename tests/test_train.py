"""The pretraining driver and its loader, end to end on CPU on a tiny cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from beitfast.config import load_config
from beitfast.data.cache import TokenCache
from beitfast.data.loader import CachedViewLoader
from beitfast.data.views import pick_view
from beitfast.masking import MaskGenerator, MaskSpec
from beitfast.tokenizers.dvae import DVAE, DVAEArch
from tests.conftest import ROOT

VOCAB = 96


@pytest.fixture(scope="module")
def cache(toy_root, tmp_path_factory):
    from data_prep.tokenize_imagenet import main as tokenize

    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    torch.save(DVAE(DVAEArch(vocab_size=VOCAB, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4)).export(32),
               d / "tok.pt")
    over = [f"tokenizer.path={d / 'tok.pt'}", "data.views=2"]
    assert tokenize(["--data", str(toy_root), "--out", str(d / "cache"), "--cfg", "tiny.yaml", "--no-progress",
                     "--max-reject", "0.05", *over]) == 0
    return d / "cache", over


def _args(cache, out, *extra):
    path, over = cache
    return ["--cfg", "tiny.yaml", f"data.cache={path}", f"log.out_dir={out}", f"model.vocab_size={VOCAB}",
            "data.batch_size=8", "train.global_batch=8", "train.epochs=2", "log.every=2", "log.progress=false", "optim.warmup_epochs=0.5",
            *over, *extra]


def _train(cache, out, *extra, nproc=1, cwd=None):
    script = str(ROOT / "beitfast" / "train.py")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script] if nproc > 1
           else [sys.executable, script])
    r = subprocess.run(cmd + _args(cache, out, *extra), cwd=cwd or ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r


def test_batch_contract(cache):
    path, over = cache
    cfg = load_config("tiny", [f"data.cache={path}", f"model.vocab_size={VOCAB}", "data.batch_size=8", *over])
    c = TokenCache(path)
    loader = CachedViewLoader(c, cfg)
    b = next(loader.epoch(3, start_step=2))
    assert b["images"].shape == (8, 3, 64, 64) and b["images"].dtype == torch.float32
    assert b["tokens"].shape == (8, 8, 8) and b["tokens"].dtype == torch.int64 and int(b["tokens"].max()) < VOCAB
    assert b["mask"].shape == (8, 8, 8) and b["mask"].dtype == torch.bool
    idx = b["index"].numpy()
    np.testing.assert_array_equal(idx, loader.batch_indices(3, 2))
    which = pick_view(cfg.train.seed, 3, idx, 2)
    want = np.stack([c.item(int(j))[3][v] for j, v in zip(idx, which)]).reshape(8, 8, 8)
    np.testing.assert_array_equal(b["tokens"].numpy(), want)
    np.testing.assert_array_equal(b["mask"].numpy(), MaskGenerator(MaskSpec.from_config(cfg.mask, 8), 0)(idx, 3))
    mean = b["images"].mean().item()
    assert -2.5 < mean < 2.5 and b["images"].std().item() > 0.2  # normalised
    # ranks take disjoint slices of the same permutation
    r0 = CachedViewLoader(c, cfg, rank=0, world=2).batch_indices(1, 0)
    r1 = CachedViewLoader(c, cfg, rank=1, world=2).batch_indices(1, 0)
    assert not set(r0) & set(r1)


def test_prefetched_batches_equal_synchronous_ones(cache):
    """The loader run in the prefetch thread (DALI rendering there) yields the same batches."""
    from beitfast.data.prefetch import prefetch

    path, over = cache
    cfg = load_config("tiny", [f"data.cache={path}", f"model.vocab_size={VOCAB}", "data.batch_size=8", *over])
    loader = CachedViewLoader(TokenCache(path), cfg)
    sync = list(loader.epoch(1, start_step=3))
    ahead = list(prefetch(CachedViewLoader(TokenCache(path), cfg).epoch(1, start_step=3), 2))
    assert len(sync) == len(ahead) == loader.steps_per_epoch - 3
    for a, b in zip(sync, ahead):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_trains_from_any_directory_with_a_bare_config_name(cache, tmp_path):
    out = tmp_path / "run"
    r = _train(cache, out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 28 and [r["step"] for r in rows] == list(range(2, 29, 2))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0], rows[-1])  # it learns
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 28 and "rel_pos_bias.relative_position_bias_table" in ck["model"]
    assert ck["config"]["model"]["vocab_size"] == VOCAB and (out / "config.yaml").exists()


def test_resume_is_bitwise(cache, tmp_path):
    assert _train(cache, tmp_path / "a").returncode == 0
    r = _train(cache, tmp_path / "b", "--stop-at", "11")
    assert r.returncode == 0 and not (tmp_path / "b" / "metrics.jsonl").read_text().count('"step": 12')
    r = _train(cache, tmp_path / "b")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_unreadable_checkpoint_is_a_clear_error_and_kept(cache, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = _train(cache, tmp_path / "x")
    assert r.returncode == 2 and "cannot read the checkpoint" in r.stderr and "ckpt.pt" in r.stderr
    assert (tmp_path / "x" / "ckpt.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_refuses_a_cache_built_otherwise(cache, tmp_path):
    r = _train(cache, tmp_path / "x", "data.views=5")
    assert r.returncode == 2 and "views: cache has 2, config wants 5" in r.stderr
    r = _train(cache, tmp_path / "y", "model.vocab_size=100")
    assert r.returncode == 2 and "vocabulary" in r.stderr


def test_ddp_two_processes(cache, tmp_path):
    r = _train(cache, tmp_path / "ddp", "train.max_steps=4", "train.global_batch=16", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["step"] == 4


def test_compiled_step_matches_eager(cache, tmp_path):
    """train.compile=true runs the step through torch.compile (inductor) and learns the same:
    its logged losses equal the eager run's up to compiler rounding."""
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        r = _train(cache, tmp_path / name, "train.max_steps=6", f"train.compile={flag}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("torch.compile" in r.stdout) == (flag == "true")
        runs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["eager"]) == 3
    np.testing.assert_allclose(runs["compiled"], runs["eager"], rtol=2e-3)


def test_gradient_accumulation_equals_a_larger_batch(cache, tmp_path):
    """Global batch 16 three ways: one process x 16, one process x 8 x 2 accumulation steps,
    two DDP processes x 8. Same images per step (the loader's slicing), masks of exactly N
    patches (so a mean of per-micro-batch means is the global mean): the same weights."""
    common = ["train.global_batch=16", "train.max_steps=4", "mask.exact=true", "log.every=1"]
    runs = {"one_16": (["data.batch_size=16"], 1), "accum_8x2": ([], 1), "ddp_2x8": ([], 2)}
    weights, losses = {}, {}
    for name, (extra, nproc) in runs.items():
        r = _train(cache, tmp_path / name, *common, *extra, nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        weights[name] = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert "2 accumulation step(s)" in _train(cache, tmp_path / "again", *common, "train.max_steps=1").stdout
    for name in ("accum_8x2", "ddp_2x8"):
        np.testing.assert_allclose(losses[name], losses["one_16"], rtol=1e-4)
        for k, w in weights["one_16"].items():
            torch.testing.assert_close(weights[name][k], w, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    # control: global batch 8 (the first half of each step's images) trains to other weights
    assert _train(cache, tmp_path / "one_8", *common, "train.global_batch=8").returncode == 0
    other = torch.load(tmp_path / "one_8" / "ckpt.pt", weights_only=True)["model"]
    assert max(float((other[k] - w).abs().max()) for k, w in weights["one_16"].items()) > 1e-3


def test_global_batch_must_be_a_multiple(cache, tmp_path):
    r = _train(cache, tmp_path / "x", "train.global_batch=20")
    assert r.returncode == 2 and "train.global_batch (20) must be a multiple of data.batch_size (8)" in r.stderr


def test_profile_steps_write_a_trace_and_an_op_table(cache, tmp_path):
    r = _train(cache, tmp_path / "p", "train.max_steps=5", "log.profile_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    trace = json.loads((tmp_path / "p" / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names) and "ProfilerStep#4" in names  # steps 3 and 4 active
    assert "aten::" in (tmp_path / "p" / "profile" / "ops.txt").read_text()
