"""scripts/gpu_check.sh rehearsed on CPU (--dry-run): every stage runs its code path at tiny
sizes, writes its JSON line, and what comes back respects the GPU machine's limits (at most 8
files of at most 16 MiB, at most 2 folders down: here two files, summary.jsonl and one tarball).
Then scripts/gpu_results.sh files it. --budget skips what no longer fits and says so."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT

# with pytest-xdist (make test runs -n 2): the tests that read the GPU check's dry run share one
# worker, so the dry run (a session fixture) runs once
pytestmark = pytest.mark.xdist_group("gpu_check")

STAGES = ["doctor", "model", "gpu_tests", "dali_loader", "train", "tokenizer", "kernels", "masking", "finetune",
          "segment"]


@pytest.mark.timeout(1800)  # the dry run, when this test is the first to ask for it
def test_dry_run_runs_every_stage_within_the_limits(gpu_check_dry_run):
    out, rows, r = gpu_check_dry_run
    assert list(rows) == STAGES, (list(rows), r.stdout[-2000:], r.stderr[-2000:])
    bad = {k: (v["status"], v.get("tail") or v.get("reason")) for k, v in rows.items() if v["status"] != "ok"}
    assert not bad and r.returncode == 0, (bad, r.stdout[-3000:])
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.jsonl"]
    assert all(os.path.getsize(out / f) < 16 * 2**20 for f in os.listdir(out))
    with tarfile.open(out / "logs.tar.gz") as t:
        names = t.getnames()
    assert not [n for n in names if n.endswith((".pt", ".beton", ".JPEG"))], names
    assert {f"./{s}.log" for s in STAGES} <= set(names)
    doc = rows["doctor"]["result"]  # python -m beitfast.doctor --cfg tiny.yaml on this CPU
    assert doc["ok"] and doc["packages"]["torch"]["imports"] and doc["throughput"]["images_per_s"] > 0
    assert [r["component"] for r in doc["self_check"]] == ["attention:sdpa"]  # auto on a CPU: the torch twins
    assert doc["auto"]["precision"].startswith("fp32")
    assert rows["model"]["result"]["images_per_s"] > 0
    assert "passed" in " ".join(rows["gpu_tests"]["tail"])


@pytest.mark.timeout(1800)
def test_results_are_filed_with_the_device(gpu_check_dry_run, tmp_path):
    out = gpu_check_dry_run[0]
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_results.sh"), str(out), str(tmp_path)],
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (dest,) = tmp_path.iterdir()
    info = json.loads((dest / "device.json").read_text())
    assert info["device"] == "cpu-dry-run" and info["packages"]["torch"] and info["stages"]["doctor"] == "ok"
    assert (dest / "logs" / "doctor.log").exists() and (dest / "summary.jsonl").exists()


def test_budget_skips_what_no_longer_fits(tmp_path):
    """A 25 s budget: only the masking stage's 20 s estimate fits (the next smallest, kernels', is
    30 s; a 30 s budget let kernels in when the script reached it within its first second);
    every other stage is skipped, each line saying why, and the run still brings back its
    summary and tarball."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "25", "--out",
                        str(tmp_path)], env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in rows] == STAGES
    ran = [x["stage"] for x in rows if x["status"] == "ok"]
    assert ran == ["masking"] and rows[STAGES.index("masking")]["result"]["speedup"] > 0, rows
    assert all(x["status"] == "skipped" and "budget" in x["reason"] for x in rows if x["stage"] != "masking"), rows
    assert sorted(os.listdir(tmp_path)) == ["logs.tar.gz", "summary.jsonl"]
