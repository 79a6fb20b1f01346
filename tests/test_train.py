"""The pretraining driver and its loader, end to end on CPU on a tiny cache."""
import json

import numpy as np
import pytest
import torch

from beitfast.tokenizers.dvae import DVAE, DVAEArch
from tests.conftest import VOCAB
from tests.trainrun import args as _args, rows as _rows, same_weights as _same_weights, train as _train

def test_trains_from_any_directory_with_a_bare_config_name(cache, tmp_path):
    out = tmp_path / "run"
    r = _train(cache, out, "log.tensorboard=true", "log.progress=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert rows[-1]["step"] == 28 and [r["step"] for r in rows] == list(range(2, 29, 2))
    # stderr is a pipe, not a terminal: one plain line a report (and one at the end), no bar refreshes
    bars = [x for x in r.stderr.splitlines() if x.startswith("[pretrain]")]
    assert "\r" not in r.stderr and len(bars) == len(rows) + 1, r.stderr[-3000:]
    assert all("ETA" in x and "img_s=" in x and len(x) < 200 for x in bars[:-1]) and bars[-2].startswith("[pretrain] 28/28")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0], rows[-1])  # it learns
    for row in rows:  # what a user reads off a report
        assert row["steps"] == 2 and row["grad_norm"] > 0 and row["step_time_ms"] > 0 and row["peak_mem_mib"] > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out))
    ev.Reload()
    loss = ev.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in rows], rtol=1e-5)
    assert {"train/grad_norm", "train/mim_acc", "train/lr"} <= set(ev.Tags()["scalars"])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 28 and "rel_pos_bias.relative_position_bias_table" in ck["model"]
    assert ck["config"]["model"]["vocab_size"] == VOCAB and (out / "config.yaml").exists()


@pytest.mark.parametrize("backend", ["reference", "ffcv"])
def test_every_backend_trains_end_to_end(cache, tmp_path, backend, request):
    """The reference and FFCV backends through the trainer (DALI, the default, is the test
    above): the loss falls over the same 28 steps."""
    if backend == "ffcv":
        request.getfixturevalue("ffcv_cache")
    out = tmp_path / backend
    r = _train(cache, out, f"data.backend={backend}")
    assert r.returncode == 0 and f"loader: {backend}" in r.stdout, r.stderr[-3000:]
    rows = _rows(out)
    assert rows[-1]["step"] == 28 and rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0], rows[-1])


def test_online_targets_learn_and_resume_bitwise(cache, toy_root, tmp_path):
    """data.targets=online, the original recipe: images read from data.root (its corrupt files
    named and skipped), a fresh view every epoch, tokenized on the device every step. The loss
    falls; killed after the checkpoint at step 9 and resumed, the run ends with the weights of
    a run that never stopped. The default data.backend (auto) takes the reference backend and
    says so; the resumed pair names it."""
    p = ["data.targets=online", f"data.root={toy_root}", "data.workers=1", "train.max_steps=14",
         "log.ckpt_every_epochs=100"]
    r = _train(cache, tmp_path / "a", *p)
    assert r.returncode == 0 and "targets online (dvae tokenizer on the CPU every step" in r.stdout, r.stderr[-3000:]
    assert "loader: reference (data.backend=auto; online targets render with the reference backend)" in r.stdout
    p.append("data.backend=reference")
    assert "skipping an unreadable image" in r.stderr
    rows = _rows(tmp_path / "a")
    assert rows[-1]["step"] == 14 and rows[-1]["loss"] < rows[0]["loss"] - 0.3, (rows[0], rows[-1])
    assert all(0 <= x["data_wait"] < 1 for x in rows)
    assert _train(cache, tmp_path / "b", *p, "train.stop_at=9").returncode == 0
    r = _train(cache, tmp_path / "b", *p)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    _same_weights(tmp_path / "a", tmp_path / "b")


def test_online_targets_need_the_tokenizer_and_the_reference_backend(cache, toy_root, tmp_path):
    r = _train(cache, tmp_path / "x", "data.targets=online", f"data.root={toy_root}", "tokenizer.path=/nope.pt")
    assert r.returncode == 2 and "tokenizer.path=/nope.pt must name the tokenizer's weights" in r.stderr
    r = _train(cache, tmp_path / "y", "data.targets=online", f"data.root={toy_root}", "data.backend=dali")
    assert r.returncode == 2 and "set data.backend=reference" in r.stderr.splitlines()[-1], r.stderr[-2000:]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bitwise(cache, tmp_path, precision, request):
    """Killed after the checkpoint at step 11 (fp32) and resumed: the same weights as a run that
    never stopped. fp16 uses torch's GradScaler (on CPU here, where fp16 is slow: 6 steps, killed
    at 3), whose state must survive the resume."""
    stop, last = (11, 28) if precision == "fp32" else (3, 6)
    p = [f"train.precision={precision}", f"train.max_steps={last}"]
    if precision == "fp32":
        (tmp_path / "a").symlink_to(request.getfixturevalue("uninterrupted_28"))
    else:
        assert _train(cache, tmp_path / "a", *p).returncode == 0
    r = _train(cache, tmp_path / "b", *p, f"train.stop_at={stop}")
    assert r.returncode == 0 and f"stopped at step {stop}" in r.stdout
    assert not (tmp_path / "b" / "metrics.jsonl").read_text().count(f'"step": {stop + 1}')
    r = _train(cache, tmp_path / "b", *p)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    a, b = _same_weights(tmp_path / "a", tmp_path / "b")
    rows = _rows(tmp_path / "b")
    assert [r["step"] for r in rows] == list(range(2, last + 1, 2))
    # the report after the resume covers one step only (so its loss differs from the uninterrupted run's)
    assert [r["steps"] for r in rows] == [1 if r["step"] == stop + 1 else 2 for r in rows]
    if precision == "fp16":
        assert a["scaler"]["_growth_tracker"] > 0 and a["scaler"] == b["scaler"]
        assert "loss_scale" in rows[-1]
        return
    assert a["scaler"] is None


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


def test_compiled_step_matches_eager(cache, tmp_path):
    """train.compile=true runs the step through torch.compile (inductor) and learns the same:
    its logged losses equal the eager run's up to compiler rounding."""
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        r = _train(cache, tmp_path / name, "train.max_steps=6", f"train.compile={flag}", "train.self_check=false")
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("torch.compile" in r.stdout) == (flag == "true")
        runs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["eager"]) == 3
    np.testing.assert_allclose(runs["compiled"], runs["eager"], rtol=2e-3)


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


def _reference_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs):
    """unilm beit/utils.py cosine_scheduler, transcribed (start_warmup_value 0, no warmup_steps)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = np.array([final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / len(iters))) for i in iters])
    return np.concatenate((warmup, cos))


@pytest.mark.parametrize("epochs,niter,warm", [(800, 625, 10), (3, 7, 1), (2, 14, 0), (5, 1, 1)])
def test_lr_schedule_is_the_reference_cosine_scheduler(epochs, niter, warm):
    from beitfast.train import lr_at

    want = _reference_cosine_scheduler(1.5e-3, 1e-5, epochs, niter, warm)
    total = epochs * niter
    steps = np.unique(np.r_[np.arange(min(total, 50)), np.linspace(0, total - 1, 200).astype(int)])
    got = np.array([lr_at(int(s), total, warm * niter, 1.5e-3, 1e-5) for s in steps])
    np.testing.assert_allclose(got, want[steps], rtol=1e-12, atol=1e-15)


def test_param_groups_follow_the_reference_no_decay_rule():
    """unilm's get_parameter_groups: no decay when 1-D, a '.bias' or in model.no_weight_decay()
    ({'pos_embed', 'cls_token'}); everything else (mask token, rel-pos table, weights) decays."""
    from beitfast.model import Beit, BeitArgs
    from beitfast.train import param_groups

    m = Beit(BeitArgs(size="tiny", img_size=32, depth=2, abs_pos_emb=True))
    decay, no_decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    got_no = {names[id(p)] for p in no_decay["params"]}
    want_no = {n for n, p in m.named_parameters()
               if len(p.shape) == 1 or n.endswith(".bias") or n in {"pos_embed", "cls_token"}}
    assert got_no == want_no and {names[id(p)] for p in decay["params"]} == set(names.values()) - want_no
    assert {"cls_token", "pos_embed", "blocks.0.gamma_1", "blocks.1.attn.q_bias", "norm.weight"} <= got_no
    assert {"mask_token", "rel_pos_bias.relative_position_bias_table", "blocks.0.attn.qkv.weight"}.isdisjoint(got_no)


def test_impossible_choices_are_refused_at_start_up(cache, tmp_path):
    """Not at the first forward with a traceback: one line naming the key, exit code 2."""
    for key, value in (("model.kernels", "apex"), ("optim.fused", "apex"), ("model.attention", "flex")):
        r = _train(cache, tmp_path / key, f"{key}={value}")
        assert r.returncode == 2, (key, r.stderr[-2000:])
        assert f"{key}={value}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / key / "metrics.jsonl").exists()


def test_tokens_of_another_tokenizer_are_refused(cache, tmp_path):
    """The cache records which tokenizer made its tokens; a config naming other weights (or
    another precision) is refused, naming the checksum."""
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(DVAE(DVAEArch(vocab_size=VOCAB, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4)).export(32), other)
    r = _train(cache, tmp_path / "x", f"tokenizer.path={other}")
    assert r.returncode == 2 and "tokenizer.weights_sha256: cache has" in r.stderr and str(other) in r.stderr
    r = _train(cache, tmp_path / "y", "tokenizer.precision=bf16")
    assert r.returncode == 2 and "tokenizer.precision: cache has 'fp32', config wants 'bf16'" in r.stderr
    r = _train(cache, tmp_path / "z", f"tokenizer.path={tmp_path / 'absent.pt'}", "train.max_steps=1")
    assert r.returncode == 0 and "is not checked against the config" in r.stdout, r.stderr[-2000:]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    """A run that diverges stops at the next report, names the steps, exits 1, and leaves the
    last good checkpoint as it was (no NaN weights are ever saved)."""
    out = tmp_path / "nan"
    assert _train(cache, out, "train.stop_at=4").returncode == 0
    before = (out / "ckpt.pt").read_bytes()
    r = _train(cache, out, "optim.lr=1e30", "optim.clip_grad=null", "log.every=3")
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradient norm in steps 5..6" in last and "(step 4) is the last good checkpoint" in last
    assert (out / "ckpt.pt").read_bytes() == before
    assert [row["step"] for row in _rows(out)] == [2, 4]


def test_an_error_in_the_loop_ends_the_run_cleanly(cache, tmp_path, capsys):
    """A failure inside the loop (here: the cache's image bytes are damaged, so DALI cannot
    decode them) ends the run with exit code 1 and the message last, naming the damaged image,
    after the DALI pipeline is shut down (threads left running into interpreter exit aborted
    the process with 'terminate called', exit code 134)."""
    import shutil

    from nvidia.dali import Pipeline

    from beitfast.train import main

    path, over = cache
    broken = tmp_path / "cache"
    shutil.copytree(path, broken)
    img = broken / "images-00000.bin"
    img.write_bytes(b"\0" * img.stat().st_size)
    args = _args((broken, over), tmp_path / "run", "train.max_steps=3")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train: failed at step 1: CacheError: ") and "cannot be decoded: image " in err[-1], err[-3:]
    assert "images-00000.bin bytes " in err[-1] and "verify_cache.py" in err[-1]
    live = [r() for r in Pipeline._pipes if r() is not None and r()._pipe is not None]
    assert not live, "a DALI pipeline is still running"
