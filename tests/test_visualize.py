"""Attention pictures: the attention read out equals what the block applies, and the CLI
draws masks and maps for a checkpoint and a random encoder."""
import json

import pytest
import torch

from beitfast.model import Beit, BeitArgs
from beitfast.visualize import attention_probs, last_attention, main, parse_points


@pytest.mark.parametrize("rel", ["shared", "per_block"])
def test_attention_probs_reproduce_the_block_output(rel):
    """probs @ v, projected, equals the block's own attention output on fresh random inputs
    (the tables made non-zero, so a missing or misplaced bias shows)."""
    m = Beit(BeitArgs(size="tiny", img_size=32, patch_size=8, vocab_size=32, rel_pos_bias=rel)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2 and p.shape[-1] == 3:  # relative-position tables (rows, heads)
                p.normal_(0, 1.0)
    attn, x = m.blocks[0].attn, torch.randn(2, 17, 192)
    bias = m.rel_pos_bias() if m.rel_pos_bias is not None else None
    probs = attention_probs(attn, x, bias)
    assert probs.shape == (2, 3, 17, 17)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 17))
    qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    v = torch.nn.functional.linear(x, attn.qkv.weight, qkv_bias).reshape(2, 17, 3, 3, 64)[:, :, 2].transpose(1, 2)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 192))
    with torch.no_grad():
        torch.testing.assert_close(out, attn(x, bias), atol=1e-5, rtol=1e-4)
    assert last_attention(m, torch.randn(1, 3, 32, 32)).shape == (1, 3, 17, 17)


def test_points_are_checked():
    assert parse_points("0.1,0.2;0.5,0.5") == [(0.1, 0.2), (0.5, 0.5)]
    with pytest.raises(ValueError, match="outside"):
        parse_points("1.2,0.3")
    with pytest.raises(ValueError, match="cannot read"):
        parse_points("a,b")


def test_cli_draws_a_checkpoint_and_a_random_encoder(toy_root, tmp_path):
    from beitfast.config import load_config

    cfg = load_config("tiny", [])
    torch.save({"model": Beit(BeitArgs.from_config(cfg.model)).state_dict(), "config": cfg.to_dict(), "step": 5},
               tmp_path / "ckpt.pt")
    for ck, out in ((str(tmp_path / "ckpt.pt"), tmp_path / "a"), ("random", tmp_path / "b")):
        assert main(["--ckpt", ck, "--data", str(toy_root), "--out", str(out), "--images", "3", "--no-progress"]) == 0
        res = json.loads((out / "attention.json").read_text())
        assert len(res["images"]) == 3 and len(res["images"][0]["entropy"]) == 3
        assert sorted({r["label"] for r in res["images"]}) == [0, 1, 2]
        assert 0 < res["mean_entropy"] <= 1 and (out / "attention.png").stat().st_size > 5000
    assert main(["--data", str(toy_root), "--out", str(tmp_path / "c"), "--points", "2,2"]) == 2


def test_predictions_draw_decoded_targets_and_the_models_argmax(toy_root, tmp_path, capsys):
    """A model whose head always says one token t (zero weights, a large bias; t the commonest
    masked target): every masked prediction is t, so the share right per image is the share of
    t among its masked targets, computed here with the same tokenizer, views and masks."""
    import numpy as np

    from beitfast.config import load_config
    from beitfast.linprobe import center_view
    from beitfast.masking import MaskGenerator, MaskSpec
    from beitfast.tokenizers.dvae import DVAE, DVAEArch, DVAETokenizer
    from beitfast.visualize import pick_images

    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    dvae = DVAE(DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4))
    torch.save(dvae.export(32), tmp_path / "tok.pt")
    cfg = load_config("tiny", [])
    picks = pick_images(str(toy_root), "val", 3)
    tok = DVAETokenizer(dvae, 32).encode(torch.stack([center_view((toy_root / f).read_bytes(), f, 32) for f, _ in picks]))
    masks = MaskGenerator(MaskSpec.from_config(cfg.mask, 8), seed=cfg.mask.seed)(np.arange(3)).astype(bool)
    masked = np.concatenate([tok[b].numpy()[masks[b]] for b in range(3)])
    t = int(np.bincount(masked).argmax())
    want = [round(float((tok[b].numpy()[masks[b]] == t).mean()), 4) for b in range(3)]
    model = Beit(BeitArgs.from_config(cfg.model))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[t] = 100.0
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 1}, tmp_path / "ckpt.pt")
    args = ["--predictions", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(toy_root), "--images", "3",
            "--tokenizer", str(tmp_path / "tok.pt"), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    res = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [r["token_acc"] for r in res["images"]] == want and max(want) > 0
    assert (tmp_path / "p" / "predictions.png").stat().st_size > 5000
    capsys.readouterr()
    assert main([*args[:-4], "--out", str(tmp_path / "q"), "--tokenizer", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_predictions_with_the_dalle_tokenizer_and_its_decoder(toy_root, tmp_path):
    """tokenizer.kind=dalle: the targets from a pickled dall_e.Encoder, drawn by a pickled
    dall_e.Decoder (OpenAI's file formats); without --decoder it says what to pass."""
    dall_e = pytest.importorskip("dall_e")
    from beitfast.config import load_config

    torch.manual_seed(0)
    torch.save(dall_e.Encoder(n_hid=16, vocab_size=512), tmp_path / "encoder.pkl")
    torch.save(dall_e.Decoder(n_init=16, n_hid=16, vocab_size=512, n_blk_per_group=1), tmp_path / "decoder.pkl")
    cfg = load_config("tiny", [])
    torch.save({"model": Beit(BeitArgs.from_config(cfg.model)).state_dict(), "config": cfg.to_dict(), "step": 1},
               tmp_path / "ckpt.pt")
    args = ["--predictions", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(toy_root), "--images", "2",
            "--out", str(tmp_path / "p"), "tokenizer.kind=dalle", f"tokenizer.path={tmp_path / 'encoder.pkl'}",
            "data.tokenizer_img_size=64"]
    assert main(args) == 2  # no decoder named
    assert main([*args, "--decoder", str(tmp_path / "decoder.pkl")]) == 0
    res = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert res["decoder"].endswith("decoder.pkl") and len(res["images"]) == 2
    assert all(0 <= r["token_acc"] <= 1 for r in res["images"])
