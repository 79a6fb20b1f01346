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
