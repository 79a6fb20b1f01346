"""The ablation runner end to end at a toy scale: a cache arm, a pixel-target arm and the two
floors run, are fine-tuned where asked, resume from results.jsonl, and give a table and a plot."""
import json

import torch

from beitfast.ablate import main


def test_ablation_runs_resumes_and_reports(small_toy, tmp_path, capsys):
    from beitfast.tokenizers.dvae import DVAE, DVAEArch

    torch.manual_seed(0)
    tok = tmp_path / "tok.pt"
    torch.save(DVAE(DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4)).export(32), tok)
    args = ["--out", str(tmp_path / "abl"), "--data", str(small_toy), "--ft-data", str(small_toy), "--dvae", str(tok),
            "--seeds", "1", "--epochs", "1", "--ft-epochs", "1", "--no-progress"]
    assert main([*args, "--arms", "k4", "pixel_target", "random_init"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "abl" / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["k4", "pixel_target", "random_init"]
    by = {r["arm"]: r for r in rows}
    assert by["k4"]["steps"] == 37 // 32 and by["k4"]["last_loss"] > 1 and by["pixel_target"]["mim_acc"] == 0
    assert "ft_acc1" in by["k4"] and "ft_acc1" in by["random_init"] and "ft_acc1" not in by["pixel_target"]
    assert all(0 <= r["acc"] <= 1 and len(r["per_block"]) == 12 for r in rows)
    capsys.readouterr()
    assert main([*args, "--arms", "k4", "random_init", "pixels_probe"]) == 0  # only pixels_probe is new
    out = capsys.readouterr().out
    assert "[ablate] pixels_probe seed 1" in out and "[ablate] k4 seed 1" not in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {"k4", "random_init", "pixels_probe"} and summary["k4"]["n"] == 1
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "cache, K=4 (demo)" in table and "raw pixels" in table and (tmp_path / "abl" / "ablation.png").exists()
