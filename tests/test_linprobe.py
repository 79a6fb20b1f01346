"""Linear probing: the heads learn what the features hold, features are cached, the CLI
runs end to end on the toy set (random and pixel floors, a pretraining checkpoint)."""
import json

import pytest
import torch

from beitfast.linprobe import knn_accuracy, main, train_heads


def test_heads_learn_separable_features_and_not_shuffled_labels():
    """Block 2's features separate the classes, block 1's are noise: the best block is 2 with
    top-1 near 1; with the labels shuffled every block is near chance."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    n, d, c = 400, 16, 4
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g) * 3
    good = centres[y] + torch.randn(n, d, generator=g)
    noise = torch.randn(n, d, generator=g)
    feats = torch.stack([noise, good])

    def split(f, lab):
        return {"features": f[:, :300], "labels": lab[:300]}, {"features": f[:, 300:], "labels": lab[300:]}

    tr, va = split(feats, y)
    res = train_heads(tr, va, epochs=100, lr=1e-2, wd=1e-4, seed=0)
    assert res["best_block"] == 2 and res["acc"] > 0.95 and res["per_block"][0] < 0.5, res
    tr, va = split(feats, y[torch.randperm(n, generator=g)])
    assert max(train_heads(tr, va, 100, 1e-2, 1e-4, 0)["per_block"]) < 0.5


def _knn_twin(xt, yt, xv, k, t):
    """The weighted kNN vote written out one validation point at a time (sorted by hand)."""
    preds = []
    for v in xv:
        sims = [(float(torch.dot(v / v.norm(), u / u.norm())), int(c)) for u, c in zip(xt, yt)]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for s, c in sims[:k]:
            votes[c] = votes.get(c, 0.0) + float(torch.tensor(s / t).exp())
        preds.append(max(votes, key=votes.get))
    return preds


def test_knn_matches_its_twin_beats_chance_and_falls_to_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    n, d, c = 240, 12, 4
    y = torch.randint(0, c, (n,), generator=g)
    good = torch.randn(c, d, generator=g)[y] * 2 + torch.randn(n, d, generator=g)
    feats = torch.stack([torch.randn(n, d, generator=g), good])
    tr, va = {"features": feats[:, :200], "labels": y[:200]}, {"features": feats[:, 200:], "labels": y[200:]}
    res = knn_accuracy(tr, va, k=7, temperature=0.1, chunk=16)
    twin = _knn_twin(feats[1, :200], y[:200], feats[1, 200:], 7, 0.1)
    assert res["per_block"][1] == round(sum(int(p == int(q)) for p, q in zip(twin, y[200:])) / 40, 4)
    assert res["best_block"] == 2 and res["acc"] > 0.8 and res["per_block"][0] < 0.6, res
    shuffled = {"features": feats[:, :200], "labels": y[:200][torch.randperm(200, generator=g)]}
    assert max(knn_accuracy(shuffled, va)["per_block"]) < 0.6


def test_cli_probes_random_pixels_and_a_checkpoint_and_reuses_features(toy_root, tmp_path, capsys):
    from beitfast.model import Beit, BeitArgs
    from beitfast.config import load_config

    out = tmp_path / "rand"
    args = ["--data", str(toy_root), "--out", str(out), "--epochs", "20", "--no-progress"]
    assert main(["--ckpt", "random", *args]) == 0
    res = json.loads((out / "probe.json").read_text())
    assert res["encoder"] == "random" and len(res["per_block"]) == 12 and 0 <= res["acc"] <= 1
    assert len(res["knn"]["per_block"]) == 12 and res["knn"]["k"] == 20 and 0 <= res["knn"]["acc"] <= 1
    assert res["val_images"] == 20 and res["train_images"] == 117  # 3 corrupt train files skipped
    assert (out / "features-train.pt").exists() and (out / "features-val.pt").exists()
    capsys.readouterr()
    assert main(["--ckpt", "random", *args]) == 0
    assert "reusing" in capsys.readouterr().out
    assert main(["--pixels", "--data", str(toy_root), "--out", str(tmp_path / "pix"), "--epochs", "20",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "pix" / "probe.json").read_text())["per_block"].__len__() == 1
    # a pretraining checkpoint of ours: the model it was trained as comes from the checkpoint
    cfg = load_config("tiny", [])
    torch.save({"model": Beit(BeitArgs.from_config(cfg.model)).state_dict(), "step": 7, "config": cfg.to_dict()},
               tmp_path / "ckpt.pt")
    assert main(["--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(toy_root), "--out", str(tmp_path / "ck"),
                 "--epochs", "5", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ck" / "probe.json").read_text())["step"] == 7


@pytest.mark.parametrize("bad,msg", [("missing.pt", "no such checkpoint"), ("garbage", "not a checkpoint")])
def test_bad_checkpoints_are_clear_errors(toy_root, tmp_path, capsys, bad, msg):
    path = tmp_path / bad
    if bad == "garbage":
        torch.save([1, 2, 3], path)
    assert main(["--ckpt", str(path), "--data", str(toy_root), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert msg in capsys.readouterr().err
