"""scripts/gpu_check.sh rehearsed on CPU (--dry-run): every stage runs its code path at tiny
sizes, writes its JSON line, and what comes back respects the GPU machine's limits (at most 8
files of at most 16 MiB, at most 2 folders down: here two files, summary.jsonl and one tarball).
Then scripts/gpu_results.sh files it. --budget skips what no longer fits and says so.

And each benchmark's tiny mode runs, so the scripts cannot rot; figures are not asserted beyond
being present and positive (speed is a benchmark's business, not a test's); the stages'
figures are read off the one dry run (a session fixture), which runs once in the suite."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT, ffcv_skip_reason

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


STAGE = {"bench_masking.py": "masking", "bench_tokenizer.py": "tokenizer", "bench_loader.py": "dali_loader",
         "bench_train.py": "train", "bench_kernels.py": "kernels", "bench_model.py": "model"}


@pytest.mark.timeout(1800)  # the first of these runs the gpu_check dry run (about 7 minutes alone)
@pytest.mark.parametrize("script,keys", [
    ("bench_masking.py", ["numba_masks_per_s", "reference_masks_per_s", "speedup", "batch2048_ms"]),
    ("bench_tokenizer.py", ["dalle_fp32_images_per_s", "dalle_bf16_images_per_s", "dalle_gflop_per_image",
                           "dalle_bf16_agreement", "dvae_tiny_bf16_agreement", "dvae_tiny_images_per_s"]),
    ("bench_tokenize.py", ["dvae_tiny_views_per_s", "dalle_images_per_s", "online_dalle_ms_per_step_b128",
                          "rss_growth_4x_data"]),
    ("bench_loader.py", ["images_per_s_reference_t2", "images_per_s_dali_t2", "ratio_dali_vs_reference_t2",
                        "jitter_max_vs_whole_image",
                        "pixel_mad_dali_vs_reference", "step_images_per_s", "together_images_per_s_dali",
                        "jitter_mad_vs_whole_image"]),
    ("bench_train.py", ["images_per_s_reference", "images_per_s_+cache", "images_per_s_+dali",
                       "images_per_s_+kernels", "images_per_s_+nosync", "images_per_s_beitfast",
                       "ratio_beitfast_vs_reference", "vit_gflop_per_image", "tokenizer_gflop_per_image"]),
    ("bench_kernels.py", ["layernorm_torch_ms", "residual_torch_ms", "head_torch_ms", "head_chunked_ms"]),
    ("bench_model.py", ["images_per_s", "mfu", "matmul_peak_tflops"]),
])


def test_benchmark_tiny_mode(script, keys, request):
    """Every code path of the full mode runs in the tiny one (bench_train writes its result rows;
    bench_loader runs every backend). The scripts that scripts/gpu_check.sh runs are read off its
    dry run (the session fixture gpu_check_dry_run), so each tiny mode runs once in the suite."""
    import io
    import tarfile

    if script in STAGE:
        out, stages, r = request.getfixturevalue("gpu_check_dry_run")
        st = stages.get(STAGE[script], {})
        assert st.get("status") == "ok", (st, r.stdout[-2000:])
        row = st["result"]
        with tarfile.open(out / "logs.tar.gz") as t:
            rows_file = t.extractfile("./bench_train_rows.jsonl").read().decode() if script == "bench_train.py" else ""
    else:
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        row = json.loads(run.stdout.strip().splitlines()[-1])
    for k in keys:
        assert row[k] > 0, k
    assert row["machine"]["cores"] >= 1
    if script == "bench_train.py":
        rows = [json.loads(x) for x in io.StringIO(rows_file).read().splitlines()]
        assert {r["recipe"] for r in rows} == set(row["recipes"]) and all(r["images_per_s"] > 0 for r in rows)
    if script == "bench_loader.py" and not ffcv_skip_reason():
        assert row["images_per_s_ffcv_t2"] > 0 and row["pixel_mad_ffcv_vs_reference"] >= 0
