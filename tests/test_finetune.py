"""Classification fine-tuning: the reference's layer decay, weights of every origin load into
timm's BEiT and compute what they computed before, 384-px table interpolation, and the CLI end
to end on the toy set (resume to the same weights, 2-process DDP, clear errors)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from beitfast.config import FinetuneConfig, load_config
from beitfast.finetune import build_classifier, layer_decay_groups, load_pretrained, main
from beitfast.model import Beit, BeitArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ft_cfg(*over):
    return load_config("finetune_tiny", list(over), schema=FinetuneConfig)


def reference_layer_id(var_name, num_max_layer):
    """Transcribed from the reference's fine-tuning script (get_num_layer_for_vit)."""
    if var_name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    elif var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        return int(var_name.split(".")[1]) + 1
    else:
        return num_max_layer - 1


def test_layer_decay_groups_match_the_reference():
    ld, wd = 0.65, 0.05
    model = build_classifier(ft_cfg("model.abs_pos_emb=true").model, 10)
    depth = len(model.blocks)
    scales = [ld ** (depth + 1 - i) for i in range(depth + 2)]
    seen = {}
    for g in layer_decay_groups(model, wd, ld):
        for name, p in zip(g["names"], g["params"]):
            seen[name] = (g["lr_scale"], g["weight_decay"])
    names = dict(model.named_parameters())
    assert set(seen) == set(names)
    for name, p in names.items():
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        want = (scales[reference_layer_id(name, depth + 2)], 0.0 if no_decay else wd)
        assert seen[name] == pytest.approx(want), name
    assert seen["head.weight"] == (1.0, wd) and seen["patch_embed.proj.weight"][0] == pytest.approx(ld ** 13)
    assert seen["blocks.0.attn.relative_position_bias_table"] == pytest.approx((ld ** 12, wd))  # decayed, as the reference


def _tiny_pretrain(seed):
    torch.manual_seed(seed)
    m = Beit(BeitArgs(size="tiny", img_size=64, patch_size=8, vocab_size=64)).eval()
    with torch.no_grad():  # non-zero tables and layer scales, so a wrong copy shows
        m.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
        for blk in m.blocks:
            blk.gamma_1.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("wrap", ["ours", "reference", "timm_file"])
def test_pretrained_weights_compute_the_same_features(tmp_path, wrap):
    """Our checkpoint ({'model', 'config'}), the reference's bare key names, and timm weights
    saved to a file all give a timm BEiT whose features equal the source encoder's."""
    src = _tiny_pretrain(int(torch.randint(1 << 20, (1,))))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = src.forward_features(x)
    path = tmp_path / "w.pth"
    if wrap == "ours":
        torch.save({"model": src.state_dict(), "config": load_config("tiny", []).to_dict(), "step": 3}, path)
    elif wrap == "reference":
        torch.save({"model": src.state_dict()}, path)
    else:
        mid = build_classifier(ft_cfg().model, 5)
        load_pretrained(mid, _save(tmp_path / "w0.pth", src))
        torch.save({"state_dict": mid.state_dict()}, path)
    model = build_classifier(ft_cfg().model, 5).eval()
    info = load_pretrained(model, str(path))
    with torch.no_grad():
        got = model.forward_features(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if wrap == "timm_file":  # a timm file of the same classes brings its head along
        assert info["fresh"] == []
    else:
        assert sorted(info["fresh"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def _save(path, model):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_larger_input_interpolates_the_relative_position_tables(tmp_path):
    """Fine-tuning at twice the pretraining size (the paper's 224 -> 384): every block's table
    is resampled to the larger grid, the three cls rows and the zero offset are kept, and the
    model runs at the new size."""
    src = _tiny_pretrain(1)
    model = build_classifier(ft_cfg("model.img_size=128").model, 5).eval()
    load_pretrained(model, _save(tmp_path / "w.pth", src))
    old = src.rel_pos_bias.relative_position_bias_table.detach()
    for blk in model.blocks:
        t = blk.attn.relative_position_bias_table.detach()
        assert t.shape == (31 * 31 + 3, 3)
        torch.testing.assert_close(t[-3:], old[-3:])
        torch.testing.assert_close(t[15 * 31 + 15], old[7 * 15 + 7], atol=1e-5, rtol=1e-4)
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 5)


def _reference_resample(table, src, dst):
    """The reference's resampling (unilm beit, run_class_finetuning.py) with scipy's spline in
    place of the removed interp2d(kind='cubic'): RectBivariateSpline(s=0) is the same FITPACK
    interpolating bicubic spline on a grid."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if 1 * (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0] + dis)
    t = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    heads = []
    for i in range(table.shape[1]):
        z = table[:-3, i].reshape(src, src).double().numpy()
        heads.append(torch.from_numpy(RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(t, t)).reshape(-1, 1))
    return torch.cat((torch.cat(heads, dim=1).float(), table[-3:]), dim=0)


@pytest.mark.parametrize("src_window,dst_window", [(14, 24), (14, 32), (8, 12), (8, 5)])
def test_rel_pos_resampling_is_the_references_cubic_spline(src_window, dst_window):
    """224 -> 384 (14 -> 24), 224 -> 512 segmentation (14 -> 32), the tests' 64 -> 96 px and a
    smaller window: every head's resampled table equals the reference's spline on fresh random
    tables; an equal window is the identity."""
    from beitfast.finetune import resample_rel_pos_table

    src, dst = 2 * src_window - 1, 2 * dst_window - 1
    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    table = torch.randn(src * src + 3, 4)
    got = resample_rel_pos_table(table, dst_window)
    assert got.shape == (dst * dst + 3, 4) and torch.equal(got[-3:], table[-3:])
    torch.testing.assert_close(got, _reference_resample(table, src, dst), rtol=1e-4, atol=1e-4)
    assert resample_rel_pos_table(table, src_window) is table
    if dst > src:  # not timm's linear default: the two differ on a random table
        from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

        lin = resize_rel_pos_bias_table(table, (dst_window, dst_window), (dst * dst + 3, 4))
        assert (lin - got).abs().max() > 1e-2
    with pytest.raises(ValueError, match="not a square window"):
        resample_rel_pos_table(torch.randn(50, 4), 4)


def test_bad_weights_are_clear_errors(tmp_path):
    model = build_classifier(ft_cfg().model, 5)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        load_pretrained(model, str(tmp_path / "junk.pth"))
    small = Beit(BeitArgs(size="small", img_size=64, patch_size=8, vocab_size=64))
    with pytest.raises(ValueError, match="model.size"):
        load_pretrained(model, _save(tmp_path / "small.pth", small))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, str(tmp_path / "nope.pth"))


FT_ARGS = ["data.batch_size=8", "train.global_batch=8", "train.epochs=2", "log.every=5", "log.progress=false",
           "optim.warmup_epochs=0.5"]


def test_cli_trains_evaluates_and_resumes_to_the_same_weights(small_toy, tmp_path, capsys):
    """Two epochs on the toy set (RandAugment, mixup, random erasing, corrupt files skipped):
    the run evaluates every epoch and writes timm-loadable weights; a run killed at step 3
    (mid-epoch) and resumed ends with bitwise the same weights and accuracy."""
    import timm

    args = ["--cfg", "finetune_tiny.yaml", f"data.root={small_toy}", *FT_ARGS]
    assert main([*args, f"log.out_dir={tmp_path / 'a'}"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 2 * (40 // 8)  # corrupt files count: each read gives the next decodable one
    assert 0 <= res["acc1"] <= res["acc5"] <= 100
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
    assert all(r["loss"] > 0 for r in rows if r["kind"] == "train")
    assert main([*args, f"log.out_dir={tmp_path / 'b'}", "train.stop_at=3"]) == 0
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    assert main([*args, f"log.out_dir={tmp_path / 'b'}"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["acc1"] == res["acc1"]
    # preempted: SIGTERM once it has stepped -> the step finishes, checkpoint, marker, exit 3; resumed, the same weights
    from tests.conftest import sigterm_when_logged

    t = sigterm_when_logged(tmp_path / "c" / "metrics.jsonl")
    assert main([*args, f"log.out_dir={tmp_path / 'c'}", "log.every=1"]) == 3
    t.join()
    at = json.loads((tmp_path / "c" / "PREEMPTED").read_text())
    assert at["signal"] == "SIGTERM" and torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["step"] == at["step"]
    assert main([*args, f"log.out_dir={tmp_path / 'c'}", "log.every=1"]) == 0 and not (tmp_path / "c" / "PREEMPTED").exists()
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], c[k]), k
    # timm's own loader reads the best weights
    m = timm.models.beit.Beit(img_size=64, patch_size=8, num_classes=4, embed_dim=192, depth=12, num_heads=3,
                              use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    assert m.head.out_features == 4
    timm.models.load_checkpoint(m, str(tmp_path / "a" / "best.pt"))


def test_two_process_ddp_runs_and_refuses_another_world_size(small_toy, tmp_path):
    """torchrun with 2 gloo ranks (global batch 8 = 2 x 4) trains and evaluates over both
    ranks' halves of the validation split; resuming its checkpoint with one process is
    refused, naming what to do."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "beitfast/finetune.py",
           "--cfg", "finetune_tiny.yaml", f"data.root={small_toy}", f"log.out_dir={out}", *FT_ARGS,
           "data.batch_size=4", "train.epochs=1"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["kind"] == "eval"]
    assert len(ev) == 1 and ev[0]["images"] == 12  # both ranks' halves counted
    assert main(["--cfg", "finetune_tiny.yaml", f"data.root={small_toy}", f"log.out_dir={out}", *FT_ARGS,
                 "data.batch_size=8", "train.epochs=2"]) == 2


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["--cfg", "finetune_tiny.yaml", "data.batch_size=7", "train.global_batch=7"]) == 2
    assert "data.batch_size must be even" in capsys.readouterr().err
    assert main(["--cfg", "finetune_tiny.yaml", "optim.layer_decay=1.5"]) == 2
    assert "optim.layer_decay" in capsys.readouterr().err
    assert main(["--cfg", "finetune_tiny.yaml", f"data.root={tmp_path}", f"log.out_dir={tmp_path / 'o'}"]) == 2
    assert "no 'train' folder" in capsys.readouterr().err
