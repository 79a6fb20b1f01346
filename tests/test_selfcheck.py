"""The start-up self-check and train.precision=auto, on CPU: the same code as on a GPU, with
Triton's interpreter. A deliberately wrong kernel must be refused before step 1."""
import json

import pytest
import torch

import kernels as K
import kernels.layernorm
from beitfast import selfcheck, train
from beitfast.config import load_config
from beitfast.precision import resolve

pytestmark = pytest.mark.skipif(not K.HAVE_TRITON, reason="triton not installed")


def _args(cache, out, *extra):
    path, over = cache
    return ["--cfg", "tiny.yaml", f"data.cache={path}", f"log.out_dir={out}", "data.backend=reference",
            "data.workers=0", "data.batch_size=8", "train.global_batch=8", "train.max_steps=2", "log.every=1",
            "log.progress=false", *over, *extra]


def test_every_fast_path_is_checked_and_passes(cache):
    """Triton kernels (interpreter), SDPA with the bias, the compiled step: each compared with its
    twin, forward and backward, and each within its tolerance."""
    cfg = load_config("tiny", [*cache[1], "model.kernels=triton", "train.compile=true"])
    rows, notes = selfcheck.startup_pretrain(cfg, torch.device("cpu"))
    assert [r["component"] for r in rows] == ["kernel:layer_norm", "kernel:residual", "kernel:masked_head",
                                              "attention:sdpa", "compile"]
    assert all(r["ok"] and r["error"] < r["tol"] for r in rows), rows
    assert "self-check on cpu" in notes[0] and "compile" in notes[0]


def _wrong_layer_norm(x, w, b, eps, out_dtype):  # a kernel off by 2% in its output
    return (kernels.layernorm.layer_norm_ref(x, w, b, eps) * 1.02).to(out_dtype)


def test_a_wrong_kernel_is_refused_at_start_up(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(K, "layer_norm_triton", _wrong_layer_norm)
    rc = train.main(_args(cache, tmp_path / "run", "model.kernels=triton"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "kernel:layer_norm" in err and "model.kernels=torch" in err and "relative error" in err, err
    assert not (tmp_path / "run" / "ckpt.pt").exists()  # nothing trained


def test_a_wrong_kernel_under_auto_falls_back_to_torch_and_says_so(cache, monkeypatch):
    """Where the key is auto, the safe path is taken instead of refusing (on a GPU auto picks
    Triton; here the policy is made to say what it says there)."""
    monkeypatch.setattr(K, "layer_norm_triton", _wrong_layer_norm)
    monkeypatch.setattr(K, "policy", lambda impl, device: {op: "triton" for op in K.OPS} if impl == "auto"
                        else {op: impl for op in K.OPS})
    cfg = load_config("tiny", [*cache[1], "model.kernels=auto"])
    rows, notes = selfcheck.startup_pretrain(cfg, torch.device("cpu"))
    assert cfg.model.kernels == "torch"
    bad = [r for r in rows if not r["ok"]]
    assert [r["component"] for r in bad] == ["kernel:layer_norm"] and bad[0]["fallback"]
    assert any("fell back to torch" in n and "kernel:layer_norm" in n for n in notes), notes


def test_a_wrong_attention_is_refused(monkeypatch):
    """The SDPA check itself: the model's attention call made wrong (the bias dropped) is caught."""
    import beitfast.model

    g = torch.Generator().manual_seed(0)
    row = selfcheck.check_sdpa(3, 48, 17, torch.device("cpu"), torch.float32, "sdpa", g)
    assert row["ok"], row
    right = beitfast.model.attend
    monkeypatch.setattr(beitfast.model, "attend", lambda q, k, v, bias, attention: right(q, k, v, None, attention))
    row = selfcheck.check_sdpa(3, 48, 17, torch.device("cpu"), torch.float32, "sdpa", g)
    assert not row["ok"] and row["avoid"] == "model.attention=flex", row


def test_timm_attention_check_for_fine_tuning(monkeypatch):
    from beitfast.config import FinetuneConfig
    from beitfast.finetune import build_classifier

    cfg = load_config("finetune_tiny", [], schema=FinetuneConfig)
    model = build_classifier(cfg.model, 10)
    rows, notes = selfcheck.startup_timm(model, torch.device("cpu"), "fp32")
    assert [r["component"] for r in rows] == ["attention:timm"] and rows[0]["ok"], rows
    assert "self-check" in notes[0]
    sdpa = torch.nn.functional.scaled_dot_product_attention  # a fused kernel that misreads the bias (timm's
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",  # unfused path does not call it)
                        lambda q, k, v, attn_mask=None, dropout_p=0.0: sdpa(q, k, v))
    with pytest.raises(selfcheck.SelfCheckFailed, match="attention:timm.*TIMM_FUSED_ATTN=0"):
        selfcheck.startup_timm(model, torch.device("cpu"), "fp32")


@pytest.mark.parametrize("cc,want", [((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_auto_follows_the_gpu(cc, want):
    got, why = resolve("auto", "cuda", capability=cc)
    assert got == want and f"{cc[0]}.{cc[1]}" in why


def test_precision_auto_on_cpu_and_bf16_refused_on_a_v100():
    assert resolve("auto", "cpu")[0] == "fp32"
    assert resolve("fp16", "cpu")[0] == "fp16"
    with pytest.raises(ValueError, match="train.precision=bf16.*no native bf16"):
        resolve("bf16", "cuda", capability=(7, 0))
    for name in ("base", "large"):
        assert load_config(name).train.precision == "auto"


def test_the_trainer_says_what_auto_chose_and_records_it(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(cache, out, "train.precision=auto")) == 0
    said = capsys.readouterr().out
    assert "precision auto: fp32 on the CPU" in said and "self-check on cpu" in said, said
    assert "precision: fp32" in (out / "config.yaml").read_text()
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["config"]["train"]["precision"] == "fp32"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_doctor_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """python -m beitfast.doctor exits 1 when a check fails (a wrong kernel injected), its JSON
    last. (Its passing run on this CPU is the dry run's doctor stage, tests/test_gpu_check.py.)"""
    from beitfast import doctor

    monkeypatch.setattr(K, "layer_norm_triton", _wrong_layer_norm)
    over = ["data.batch_size=2", "model.img_size=32", "mask.num_patches=4", "mask.min_patches=2", "model.kernels=triton"]
    assert doctor.main(["--cfg", "tiny.yaml", "--steps", "0", *over]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not rep["ok"] and "kernel:layer_norm" in rep["failed"][0]
