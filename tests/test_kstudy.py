"""The long-schedule K study at a toy scale: the shrunk data, cache arms and the online arm with
the memorisation probe, the floors, resume from results.jsonl, the table and the plot; and the
memorisation probe's own properties."""
import json

import pytest
import torch
from PIL import Image

from beitfast.kstudy import main


@pytest.fixture(scope="module")
def study(small_toy, tmp_path_factory):
    from beitfast.tokenizers.dvae import DVAE, DVAEArch

    d = tmp_path_factory.mktemp("kstudy")
    torch.manual_seed(0)
    torch.save(DVAE(DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4)).export(32),
               d / "tok.pt")
    args = ["--out", str(d / "ks"), "--source", str(small_toy), "--data", str(d / "small48"), "--max-side", "48",
            "--dvae", str(d / "tok.pt"), "--epochs", "2", "--seeds", "0", "--ft-epochs", "1", "--eval-images", "16",
            "--batch", "8", "--no-progress"]
    assert main([*args, "--arms", "k1", "online", "random_init"]) == 0
    return d, args


def test_study_runs_arms_probes_memorisation_and_resumes(study, small_toy, capsys):
    d, args = study
    rows = [json.loads(x) for x in (d / "ks" / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["k1", "online", "random_init"]
    by = {r["arm"]: r for r in rows}
    for arm, images in (("k1", 37), ("online", 40)):  # the cache holds the 37 decodable images; online reads 40 files
        r = by[arm]
        assert r["steps"] == 2 * (images // 8) and r["epochs"] == 2 and r["last_loss"] > 1
        assert [c[0] for c in r["mim_curve"]] == [0, 1.0, 2.0]  # before training, then every epoch
        assert all(0 <= x <= 1 for c in r["mim_curve"] for x in c[1:]) and r["mim_gap"] == pytest.approx(
            r["mim_cached"] - r["mim_fresh"], abs=1e-5)
    for r in rows:
        assert 0 <= r["probe"] <= 1 and 0 <= r["knn"] <= 1 and 0 <= r["finetune"] <= 1
    # the shrunk tree: every decodable image at most 48 px a side, the corrupt files still there and still corrupt
    shrunk = sorted((d / "small48" / "train").rglob("*.JPEG"))
    assert len(shrunk) == len(sorted((small_toy / "train").rglob("*.JPEG")))
    sides = []
    for p in shrunk:
        try:
            im = Image.open(p)
            im.load()  # a truncated file has a readable header: only whole images count
        except Exception:
            continue
        sides.append(max(im.size))
    assert sides and max(sides) <= 48
    capsys.readouterr()
    assert "cache_seconds" in by["k1"] and by["k1"]["cache_seconds"] >= 0 and "cache_seconds" not in by["online"]
    assert not (d / "ks" / "kstudy_headline.md").exists()  # no reference arm yet: no headline
    # a row that records no tokenizer (an older runner's) is kept in the file but neither reused nor reported
    old = {k: v for k, v in {**by["k1"], "arm": "k4", "k": 4}.items() if k != "tokenizer_sha256"}
    with open(d / "ks" / "results.jsonl", "a") as f:
        f.write(json.dumps(old) + "\n")
    assert main([*args, "--arms", "k1", "k2", "reference", "random_init", "--headline", "k1"]) == 0  # k2, reference new
    out = capsys.readouterr().out
    assert "[kstudy] k2, 2 epochs, seed 0" in out and "[kstudy] k1, 2 epochs" not in out
    assert "1 finished run(s)" in out and "recorded none" in out
    summary = json.loads(out.strip().splitlines()[-1])
    # the report holds every finished run, and the headline: the original recipe against K = 1
    assert set(summary) == {"k1_e2", "online_e2", "k2_e2", "reference_e2", "random_init_e0", "headline"}
    head = summary["headline"]
    assert set(head) == {"reference_e2", "k1_e2", "speedup_e2"} and head["k1_e2"]["seeds"] == [0]
    ref = [json.loads(x) for x in (d / "ks" / "results.jsonl").read_text().splitlines()][-1]
    assert ref["arm"] == "reference" and ref["steps"] == by["online"]["steps"]  # equal steps to the online arm
    assert head["reference_e2"]["seconds"] == ref["pretrain_seconds"]
    assert head["speedup_e2"] == pytest.approx(ref["pretrain_seconds"] / (by["k1"]["pretrain_seconds"]
                                                                          + by["k1"]["cache_seconds"]), abs=1e-3)
    capsys.readouterr()
    assert main([*args, "--arms", "k4", "--report", "--headline", "k1", "--publish", str(d / "docs")]) == 0  # k4 not run
    out = capsys.readouterr().out
    assert "[kstudy] k4" not in out and set(json.loads(out.strip().splitlines()[-1])) == set(summary)
    assert sorted(p.name for p in (d / "docs").iterdir()) == ["kstudy.md", "kstudy.png", "kstudy_headline.md",
                                                               "kstudy_results.jsonl"]
    table = (d / "ks" / "kstudy.md").read_text()
    assert "| 2 | k2 | 2 | 1 |" in table and "| 2 | reference | fresh | 1 |" in table and "random_init" in table
    assert (d / "ks" / "kstudy.png").stat().st_size > 0
    lines = (d / "ks" / "kstudy_headline.md").read_text().splitlines()
    assert lines[2].startswith("| 2 | original recipe | 1 |") and lines[3].startswith("| 2 | beitfast (K = 1) | 1 |")


def test_memorisation_probe_is_a_pure_read_and_refuses_other_images(study, tmp_path):
    from beitfast.config import load_config
    from beitfast.data.cache import CacheError
    from beitfast.mim_eval import MimProbe, parse_spec
    from beitfast.model import Beit, BeitArgs

    d, _ = study
    caches = d / "ks" / "caches"
    cfg = load_config("micro", [f"log.mim_eval=a:{caches / 'k1_s0'},b:{caches / 'k1_s0'},c:{caches / 'fresh_s0'}",
                                "log.mim_eval_images=20"])
    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    model = Beit(BeitArgs.from_config(cfg.model)).train()
    probe = MimProbe(cfg, torch.device("cpu"), batch=7)
    state = torch.get_rng_state()
    res = probe(model)
    assert torch.equal(state, torch.get_rng_state()) and model.training  # no random draw, the mode restored
    assert res["a"] == res["b"] and set(res) == {"a", "b", "c"} and probe.n == 20
    assert res == probe(model)
    with pytest.raises(ValueError, match="not name:DIR"):
        parse_spec("cached")
    with pytest.raises(ValueError, match="repeated or reserved"):
        parse_spec("step:x")
    # a cache of other images under one of the names is refused, naming the image
    from data_prep.make_toy_imagenet import make
    from data_prep.tokenize_imagenet import main as tokenize

    make(tmp_path / "other", classes=2, per_class=10, val_per_class=1, seed=9, corrupt=False, progress=False)
    assert tokenize(["--data", str(tmp_path / "other"), "--out", str(tmp_path / "oc"), "--cfg", "micro.yaml",
                     "--views", "1", "--no-progress", f"tokenizer.path={d / 'tok.pt'}", "data.views=1"]) == 0
    cfg = load_config("micro", [f"log.mim_eval=a:{caches / 'k1_s0'},b:{tmp_path / 'oc'}"])
    with pytest.raises(CacheError, match="not the same image"):
        MimProbe(cfg, torch.device("cpu"))


def _script(name, *args, **env):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run(["bash", str(ROOT / "scripts" / name), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHON=sys.executable, **env))


def test_sweep_scripts_tiny_modes_write_rows_resume_and_report(study, tmp_path):
    """scripts/seg_sweep.sh and probe_sweep.sh, the README's segmentation and probe sweeps, in
    their tiny modes on an encoder of the study: a row per finished run, a missing checkpoint
    skipped and the exit status 1, a second call runs nothing, the report's table."""
    d, _ = study
    ck = d / "ks" / "runs" / "k1_e2_s0" / "pretrain" / "ckpt.pt"
    seg = {"SWEEP_OUT": str(tmp_path / "seg")}
    r = _script("seg_sweep.sh", "--tiny", f"pre={ck}", f"gone={tmp_path / 'none.pt'}", **seg)
    assert r.returncode == 1 and "gone skipped" in r.stdout and "SWEEP DONE" in r.stdout, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "seg" / "results.jsonl").read_text().splitlines()]
    assert [(x["encoder"], x["head"], x["iters"]) for x in rows] == [("pre", "upernet", 2)], rows
    assert 0 <= rows[0]["miou"] <= 100 and rows[0]["ckpt"] == str(ck)
    assert not list((tmp_path / "seg").glob("*/ckpt.pt"))  # the sweep keeps rows, not checkpoints
    r = _script("seg_sweep.sh", "--tiny", f"pre={ck}", **seg)
    assert r.returncode == 0 and len((tmp_path / "seg" / "results.jsonl").read_text().splitlines()) == 1, r.stdout
    r = _script("seg_sweep.sh", "--report", tmp_path / "seg" / "results.jsonl")
    assert r.returncode == 0 and "| upernet | 0.65 | 0.001 | 2 | 0 | " in r.stdout and "pre: mIoU" in r.stdout, r.stdout

    probe = {"PROBE_OUT": str(tmp_path / "probe")}
    r = _script("probe_sweep.sh", "--tiny", ck, d / "small48", **probe)
    assert r.returncode == 0 and "SWEEP DONE" in r.stdout, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "probe" / "results.jsonl").read_text().splitlines()]
    assert [(x["encoder"], x["epochs"], x["lr"]) for x in rows] == [("k2_e200", 1, 0.01), ("random", 1, 0.01),
                                                                    ("pixels", 1, 0.01)]
    assert all(0 <= x["acc"] <= 1 and 0 <= x["knn"] <= 1 for x in rows)
    r = _script("probe_sweep.sh", "--tiny", ck, d / "small48", **probe)
    assert r.returncode == 0 and len((tmp_path / "probe" / "results.jsonl").read_text().splitlines()) == 3, r.stdout
