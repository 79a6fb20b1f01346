"""Each benchmark's tiny mode runs, so the scripts cannot rot; figures are not asserted
beyond being present and positive (speed is a benchmark's business, not a test's)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, ffcv_skip_reason

# with pytest-xdist (make test runs -n 2): the tests that read the GPU check's dry run share one
# worker, so the dry run (a session fixture) runs once
pytestmark = pytest.mark.xdist_group("gpu_check")


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
    dry run (tests/test_gpu_check.py), so each tiny mode runs once in the suite."""
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
