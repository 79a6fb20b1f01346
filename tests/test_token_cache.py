"""Offline pre-tokenization: the cache, its checks, crash safety and multi-process runs."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.config import load_config
from beitfast.data.cache import CacheError, TokenCache, expected_settings
from beitfast.data.images import list_imagefolder
from beitfast.tokenizers import build_tokenizer
from beitfast.tokenizers.dvae import DVAE, DVAEArch
from tests.conftest import ROOT, in_process

SCRIPT = str(ROOT / "data_prep" / "tokenize_imagenet.py")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    torch.manual_seed(0)
    model = DVAE(DVAEArch(vocab_size=128, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4))
    p = tmp_path_factory.mktemp("tok") / "tokenizer.pt"
    torch.save(model.export(32), p)
    return p


def _overrides(tok_path):
    return [f"tokenizer.path={tok_path}", "data.views=3", "data.num_threads=2"]


def _run(toy_root, out, tok_path, *extra, nproc=1, check=True, popen=False):
    base = [SCRIPT, "--data", str(toy_root), "--out", str(out), "--cfg", "tiny.yaml", "--shard-size", "16",
            "--no-progress", "--render-batch", "32", *_overrides(tok_path), *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
           else [sys.executable]) + base
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if nproc == 1:  # in this process, one torch thread as OMP_NUM_THREADS=1 gives the torchrun twins
        from data_prep.tokenize_imagenet import main

        r = in_process(main, base[1:], threads=1)
    else:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _tree(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def cache_dir(toy_root, tok_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    r = _run(toy_root, out, tok_path, "--max-reject", "0.05")
    assert "rejected" in r.stdout
    return out


def test_cache_contents(cache_dir, toy_root, tok_path):
    paths, labels, _ = list_imagefolder(toy_root, "train")
    c = TokenCache(cache_dir)
    m = c.manifest
    odd = json.loads((toy_root / "toy_manifest.json").read_text())["odd"]
    bad = sorted(p for p, k in odd.items() if k in ("truncated", "empty", "garbage"))
    assert sorted(r["path"] for r in m["rejected"]) == bad and all(r["reason"] for r in m["rejected"])
    assert m["counts"] == {"images": 120, "ok": 117, "rejected": 3, "shards": 8, "views": 351, "grid": [8, 8]}
    assert len(c) == 117
    ok_paths = [p for p in paths if p not in bad]
    np.testing.assert_array_equal(c.labels, [labels[paths.index(p)] for p in ok_paths])
    for j in range(len(c)):
        data, label, views, toks = c.item(j)
        im = Image.open(io.BytesIO(bytes(data)))
        assert im.format == "JPEG" and im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1
        assert views.shape == (3,) and toks.shape == (3, 64) and toks.dtype == np.uint16 and toks.max() < 128
        rel = ok_paths[j]
        if odd.get(rel) == "exif":  # stored upright: the EXIF rotation was applied
            raw = Image.open(toy_root / rel)
            assert im.size == raw.size[::-1]
        elif rel not in odd:  # plain JPEGs are stored byte for byte
            assert bytes(data) == (toy_root / rel).read_bytes()


def test_verify_reports_agreement_and_tampering(cache_dir, tok_path, tmp_path):
    from data_prep.verify_cache import main as verify

    args = ["--cache", str(cache_dir), "--cfg", "tiny.yaml", "--sample", "120", *_overrides(tok_path)]
    assert verify(args) == 0
    tampered = tmp_path / "t"
    tampered.mkdir()
    for name, data in _tree(cache_dir).items():
        (tampered / name).write_bytes(data)
    tok = np.load(tampered / "tokens-00000.npy")
    tok[0, 0, 0] = (int(tok[0, 0, 0]) + 1) % 128
    np.save(tampered / "tokens-00000.npy", tok)
    assert verify(["--cache", str(tampered), *args[2:]]) == 1


def test_verify_json_line(cache_dir, tok_path):
    r = subprocess.run([sys.executable, str(ROOT / "data_prep" / "verify_cache.py"), "--cache", str(cache_dir),
                        "--cfg", "tiny.yaml", "--sample", "60", *_overrides(tok_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and row["images"] == 117 and row["views"] == 351 and row["rejected"] == 3
    assert row["token_agreement"] >= 0.995


def test_reader_refuses_other_settings(cache_dir, tok_path):
    c = TokenCache(cache_dir)
    cfg = load_config("tiny", _overrides(tok_path))
    tok = build_tokenizer(cfg.tokenizer, 32)
    c.check(expected_settings(cfg, tok.identity))
    with pytest.raises(CacheError, match=r"views: cache has 3, config wants 5"):
        c.check(expected_settings(cfg, tok.identity, views=5))
    other = dict(tok.identity, weights_sha256="0" * 64)
    with pytest.raises(CacheError, match=r"tokenizer.weights_sha256"):
        c.check(expected_settings(cfg, other))
    cfg2 = load_config("tiny", _overrides(tok_path) + ["data.color_jitter=0.2"])
    with pytest.raises(CacheError, match=r"aug.jitter"):
        c.check(expected_settings(cfg2, tok.identity))


def test_incomplete_and_foreign_caches(tmp_path, cache_dir):
    with pytest.raises(CacheError, match="no manifest.json"):
        TokenCache(tmp_path)
    bad = tmp_path / "v2"
    bad.mkdir()
    m = json.loads((cache_dir / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(dict(m, version=99)))
    with pytest.raises(CacheError, match="version 99"):
        TokenCache(bad)


def test_other_settings_into_same_dir_refused(cache_dir, toy_root, tok_path):
    r = _run(toy_root, cache_dir, tok_path, "data.views=2", check=False)
    assert r.returncode == 2 and "other settings" in r.stderr and "views" in r.stderr


def test_too_many_rejects_fails(toy_root, tok_path, tmp_path):
    r = _run(toy_root, tmp_path / "c", tok_path, "--max-reject", "0.01", check=False)
    assert r.returncode == 1 and "max-reject" in r.stderr
    assert (tmp_path / "c" / "manifest.json").exists()  # the work is kept, the verdict is the exit code


def test_kill9_then_resume_is_byte_identical(cache_dir, toy_root, tok_path, tmp_path):
    out = tmp_path / "killed"
    for wait_for in ("shard-00001.json", "shard-00004.json"):
        p = _run(toy_root, out, tok_path, "--max-reject", "0.05", popen=True)
        deadline = time.time() + 120
        while not (out / wait_for).exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (out / "manifest.json").exists()
    _run(toy_root, out, tok_path, "--max-reject", "0.05")
    assert _tree(out) == _tree(cache_dir)


def test_sigterm_finishes_the_shard_exits_3_and_resumes_byte_identical(cache_dir, toy_root, tok_path, tmp_path):
    out = tmp_path / "preempted"
    p = _run(toy_root, out, tok_path, "--max-reject", "0.05", popen=True)
    deadline = time.time() + 120
    while not (out / "shard-00001.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 3
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] >= 1 and not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))  # the shard in progress was finished, not left half-written
    _run(toy_root, out, tok_path, "--max-reject", "0.05")
    assert _tree(out) == _tree(cache_dir)  # the marker is gone too


def test_two_ranks_equal_one(cache_dir, toy_root, tok_path, tmp_path):
    _run(toy_root, tmp_path / "ddp", tok_path, "--max-reject", "0.05", nproc=2)
    assert _tree(tmp_path / "ddp") == _tree(cache_dir)


def test_two_nodes_equal_one(cache_dir, toy_root, tok_path, tmp_path):
    """The shard split across two torchrun 'nodes' (c10d rendezvous) writes the same cache."""
    from tests.conftest import run_two_nodes

    res = run_two_nodes([SCRIPT, "--data", str(toy_root), "--out", str(tmp_path / "nodes"), "--cfg", "tiny.yaml",
                         "--shard-size", "16", "--no-progress", "--render-batch", "32", *_overrides(tok_path),
                         "--max-reject", "0.05"])
    assert [rc for rc, _, _ in res] == [0, 0], "\n".join(e[-2000:] for _, _, e in res)
    assert _tree(tmp_path / "nodes") == _tree(cache_dir)


def test_file_list_input(toy_root, tok_path, tmp_path):
    paths, labels, _ = list_imagefolder(toy_root, "val")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p} {l}\n" for p, l in zip(paths, labels)))
    _run(toy_root, tmp_path / "c", tok_path, "--file-list", str(lst))
    c = TokenCache(tmp_path / "c")
    assert len(c) == len(paths) and list(c.labels) == list(labels)
    lst.write_text("no-label-here\n")
    r = _run(toy_root, tmp_path / "d", tok_path, "--file-list", str(lst), check=False)
    assert r.returncode == 2 and "list.txt:1" in r.stderr


def test_an_unlabeled_folder_tokenizes_pretrains_and_the_probe_refuses_it(tok_path, tmp_path, capsys):
    """Users' own images: any depth, any format Pillow reads, no classes. The cache holds them
    with label -1 and says it is unlabeled; pretraining runs on it; the probe asks for labels."""
    root = tmp_path / "mine"
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % (1 << 32)))
    files = {"a/b/x.jpg": "JPEG", "a/y.png": "PNG", "z.webp": "WEBP", "w.JPEG": "JPEG", "c/d/e/v.bmp": "BMP"}
    for rel, fmt in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48 + len(rel), 64, 3), dtype=np.uint8)).save(root / rel, fmt)
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "bad.jpg").write_bytes(b"garbage")
    r = _run(root, tmp_path / "c", tok_path, "--unlabeled", "--max-reject", "0.5")
    c = TokenCache(tmp_path / "c")
    assert len(c) == 5 and (c.labels == -1).all() and not c.labeled and "a/bad.jpg" in r.stdout
    assert TokenCache(tmp_path / "c").manifest["classes"] == []
    from beitfast.train import main as train

    over = ["--cfg", "tiny.yaml", f"data.cache={tmp_path / 'c'}", f"log.out_dir={tmp_path / 'run'}", "data.batch_size=2",
            "train.global_batch=2", "train.epochs=1", "log.every=1", "log.progress=false", "model.vocab_size=128",
            *_overrides(tok_path)]
    assert train(over) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    from beitfast.linprobe import main as linprobe

    for data in (root, tmp_path / "c"):
        capsys.readouterr()
        assert linprobe(["--data", str(data), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert ("need labels" in err if data == root else "is a token cache, not an image folder" in err), err
    # the same images through a list without labels; a labelled reading of that list names its line
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(files)))
    _run(root, tmp_path / "l", tok_path, "--unlabeled", "--file-list", str(lst))
    assert len(TokenCache(tmp_path / "l")) == 5
    r = _run(root, tmp_path / "m", tok_path, "--file-list", str(lst), check=False)
    assert r.returncode == 2 and "list.txt:1" in r.stderr and "--unlabeled" in r.stderr
