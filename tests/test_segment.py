"""Semantic segmentation: the toy ADE20K-layout set, the reader, the backbone's strides, both
task layers, sliding-window inference and mIoU against twins, the schedule and layer decay,
and the CLI end to end (resume to the same weights, 2-process DDP, clear errors)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from beitfast.config import ConfigError, SegConfig, load_config
from beitfast.segment import (IGNORE, Segmenter, iou_from_confusion, confusion, list_ade20k, main, poly_lr,
                              read_pair, seg_param_groups, slide_logits)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seg_cfg(*over):
    return load_config("seg_tiny", list(over), schema=SegConfig)


@pytest.fixture(scope="module")
def toy_seg(tmp_path_factory):
    from data_prep.make_toy_imagenet import make_segmentation

    out = tmp_path_factory.mktemp("seg") / "ade"
    make_segmentation(out, train=16, val=4, progress=False)
    return out


def test_toy_set_labels_follow_the_shapes_and_reader_reduces_zero(toy_seg, tmp_path):
    from data_prep.make_toy_imagenet import SHAPES, TEXTURES, class_params, make_segmentation

    pairs = list_ade20k(toy_seg, "training")
    assert len(pairs) == 16 and all(p[0].endswith(".jpg") and p[1].endswith(".png") for p in pairs)
    for i, (img_p, ann_p) in enumerate(pairs[:10]):
        p = class_params(i % 10, 0)
        from PIL import Image

        raw = np.array(Image.open(ann_p))
        bg, fg = 1 + TEXTURES.index(p["texture"]), 1 + len(TEXTURES) + SHAPES.index(p["shape"]) \
            if p["shape"] != "none" else None
        assert set(np.unique(raw)) <= {0, bg, fg} and (raw == bg).mean() > 0.3
        if fg is not None:
            assert (raw == fg).sum() > 0 and (raw == 0).sum() > 0  # the shape and its unlabelled ring
        img, lab = read_pair(img_p, ann_p, reduce_zero_label=True)
        assert img.shape[:2] == lab.shape
        assert np.array_equal(lab == IGNORE, raw == 0) and np.array_equal(lab[raw > 0], raw[raw > 0] - 1)
    # deterministic
    again = make_segmentation(tmp_path / "again", train=16, val=4, progress=False)
    assert again["pixels_per_label"] == json.loads((toy_seg / "toy_seg_manifest.json").read_text())["pixels_per_label"]
    kept = open(pairs[3][1], "rb").read()
    os.remove(pairs[3][1])
    try:
        with pytest.raises(FileNotFoundError, match="no annotation for 1 image"):
            list_ade20k(toy_seg, "training")
    finally:
        open(pairs[3][1], "wb").write(kept)
    with pytest.raises(ValueError, match="label map for a"):
        read_pair(pairs[3][0], pairs[4][1], True)


@pytest.mark.parametrize("head", ["upernet", "setr_pup"])
def test_backbone_strides_and_heads(head):
    m = Segmenter(seg_cfg(f"model.head={head}")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, last = m.backbone(x)
        out, aux = m(x)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]  # strides patch/4, patch/2, patch, 2 x patch
    assert last.shape == (2, 192, 8, 8) and out.shape == (2, 8, 64, 64) and aux is None
    with torch.no_grad():  # either head ends at stride 1 (SETR-PUP: log2(8) = 3 upsampling stages), unresized
        raw = m.decode_head(feats if head == "upernet" else last)
    assert raw.shape[-1] == {"upernet": 32, "setr_pup": 64}[head]
    m.train()
    assert m(x)[1].shape == (2, 8, 64, 64)


def test_slide_inference_averages_the_windows():
    """An image of the window's size is one forward pass; a wider one averages the two
    overlapping windows (checked column by column on fresh random inputs)."""
    m = Segmenter(seg_cfg()).eval()
    x = torch.randn(1, 3, 64, 100)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(m, x[..., :64], 64, 43, 8), m(x[..., :64])[0])
        got = slide_logits(m, x, 64, 43, 8)
        left, right = m(x[..., :64])[0], m(x[..., 36:100])[0]
    want = torch.zeros(1, 8, 64, 100)
    want[..., :36] = left[..., :36]
    want[..., 64:] = right[..., 28:]
    want[..., 36:64] = (left[..., 36:] + right[..., :28]) / 2
    torch.testing.assert_close(got, want)


def test_miou_matches_a_direct_count():
    g = torch.Generator().manual_seed(int(torch.randint(1 << 20, (1,))))
    n = 6
    lab = torch.randint(0, n, (50, 40), generator=g)
    lab[torch.rand(50, 40, generator=g) < 0.1] = IGNORE
    lab[lab == 5] = 4  # class 5 never occurs in the labels
    pred = torch.randint(0, n - 1, (50, 40), generator=g)  # nor in the predictions
    res = iou_from_confusion(confusion(pred, lab, n).numpy())
    keep = lab != IGNORE
    ious = []
    for c in range(n):
        inter = ((pred == c) & (lab == c) & keep).sum().item()
        union = (((pred == c) | (lab == c)) & keep).sum().item()
        ious.append(inter / union if union else None)
    assert res["iou"] == pytest.approx(ious) and res["iou"][5] is None
    assert res["miou"] == pytest.approx(100 * np.mean([v for v in ious if v is not None]))
    assert res["aacc"] == pytest.approx(100 * ((pred == lab) & keep).sum().item() / keep.sum().item())


def test_schedule_and_layer_decay():
    cfg = seg_cfg()
    o = cfg.optim
    assert poly_lr(0, o, 100) == pytest.approx(o.lr * o.warmup_ratio)
    assert poly_lr(o.warmup_iters, o, 100) == pytest.approx(o.lr * (1 - o.warmup_iters / 100))
    assert poly_lr(100, o, 100) == pytest.approx(o.min_lr)
    m = Segmenter(cfg)
    scale = {id(p): g["lr_scale"] for g in seg_param_groups(m, 0.05, 0.65) for p in g["params"]}
    named = dict(m.named_parameters())
    assert len(scale) == len(named)
    assert scale[id(named["backbone.vit.blocks.3.mlp.fc1.weight"])] == pytest.approx(0.65 ** 9)
    assert scale[id(named["backbone.vit.patch_embed.proj.weight"])] == pytest.approx(0.65 ** 13)
    assert scale[id(named["decode_head.cls.1.weight"])] == 1.0 and scale[id(named["backbone.fpn2.weight"])] == 1.0


SEG_ARGS = ["data.batch_size=4", "train.global_batch=4", "train.iters=8", "train.eval_every=4",
            "log.every=2", "log.ckpt_every=4", "log.progress=false"]


def test_cli_trains_evaluates_and_resumes_to_the_same_weights(toy_seg, tmp_path, capsys):
    args = ["--cfg", "seg_tiny.yaml", f"data.root={toy_seg}", *SEG_ARGS]
    assert main([*args, f"log.out_dir={tmp_path / 'a'}"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["iters"] == 8 and 0 <= res["miou"] <= 100 and len(res["iou"]) == 8
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "eval"] == [4, 8]
    assert (tmp_path / "a" / "predictions.png").stat().st_size > 5000
    assert main([*args, f"log.out_dir={tmp_path / 'b'}", "train.stop_at=3"]) == 0
    assert main([*args, f"log.out_dir={tmp_path / 'b'}"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["miou"] == res["miou"]
    # preempted (SIGTERM once it has stepped), then resumed: the same weights
    from tests.conftest import sigterm_when_logged

    t = sigterm_when_logged(tmp_path / "c" / "metrics.jsonl")
    assert main([*args, f"log.out_dir={tmp_path / 'c'}", "log.every=1"]) == 3
    t.join()
    assert json.loads((tmp_path / "c" / "PREEMPTED").read_text())["signal"] == "SIGTERM"
    assert main([*args, f"log.out_dir={tmp_path / 'c'}", "log.every=1"]) == 0
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_pretrained_weights_load_and_ddp_runs(toy_seg, tmp_path):
    """A pretraining checkpoint of ours loads into the backbone (tables resampled when the
    crop differs); 2 gloo ranks train and evaluate, counting both halves of the split."""
    from beitfast.model import Beit, BeitArgs

    cfg = load_config("tiny", [])
    torch.save({"model": Beit(BeitArgs.from_config(cfg.model)).state_dict(), "config": cfg.to_dict()},
               tmp_path / "ck.pt")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "beitfast/segment.py",
           "--cfg", "seg_tiny.yaml", f"data.root={toy_seg}", f"log.out_dir={out}", *SEG_ARGS,
           "data.batch_size=2", "train.iters=2", "train.eval_every=2", "model.img_size=80",
           f"model.pretrained={tmp_path / 'ck.pt'}", "train.stride=60"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["iters"] == 2 and res["pretrained"].endswith("ck.pt")


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["--cfg", "seg_tiny.yaml", f"data.root={tmp_path}", f"log.out_dir={tmp_path / 'o'}"]) == 2
    assert "expected the ADE20K layout" in capsys.readouterr().err
    assert main(["--cfg", "seg_tiny.yaml", "model.out_indices=[3, 5, 7, 12]"]) == 2
    assert "model.out_indices" in capsys.readouterr().err


def test_backbone_blocks_equal_the_pretrained_encoder_at_the_pretraining_size(tmp_path):
    """Loading a pretraining checkpoint into the segmentation backbone (timm's naming, the
    shared relative-position table copied into every block, the pruning of the blocks after the
    last chosen one, a rel-pos resampling at an equal size) changes no block's output: the
    backbone's maps are the encoder's patch tokens after blocks `out_indices`."""
    from beitfast.model import Beit, BeitArgs

    cfg = load_config("tiny", [])
    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    enc = Beit(BeitArgs.from_config(cfg.model)).eval()
    with torch.no_grad():  # every weight informative: layer scales, rel-pos tables, norms off their init
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"model": enc.state_dict(), "config": cfg.to_dict()}, tmp_path / "ck.pt")
    seg = Segmenter(seg_cfg(f"model.img_size={cfg.model.img_size}")).eval()
    from beitfast.finetune import load_pretrained

    load_pretrained(seg.backbone.vit, str(tmp_path / "ck.pt"))
    x = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        t, bias = enc.embed(x)
        want = []
        for i, blk in enumerate(enc.blocks):
            t = blk(t, bias)
            if i in seg.backbone.out_indices:
                g = cfg.model.img_size // cfg.model.patch_size
                want.append(t[:, 1:].transpose(1, 2).reshape(3, -1, g, g))
        got = seg.backbone.vit.forward_intermediates(x, indices=seg.backbone.out_indices, output_fmt="NCHW",
                                                     intermediates_only=True, stop_early=True)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_setr_pup_needs_a_power_of_two_patch():
    with pytest.raises(ConfigError, match="model.patch_size must be a power of 2, got 6"):
        seg_cfg("model.head=setr_pup", "model.patch_size=6", "model.img_size=48")
    seg_cfg("model.head=upernet", "model.patch_size=6", "model.img_size=48")  # UperNet has no such constraint
