"""Each benchmark's tiny mode runs, so the scripts cannot rot; figures are not asserted
beyond being present and positive (speed is a benchmark's business, not a test's)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, ffcv_skip_reason


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
def test_benchmark_tiny_mode(script, keys, tmp_path):
    """Every code path of the full mode runs in the tiny one (bench_train writes its result rows,
    here to a temporary file; bench_loader runs every backend)."""
    extra = ["--results", str(tmp_path / "rows.jsonl")] if script == "bench_train.py" else []
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    for k in keys:
        assert row[k] > 0, k
    assert row["machine"]["cores"] >= 1
    if script == "bench_train.py":
        rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
        assert {r["recipe"] for r in rows} == set(row["recipes"]) and all(r["images_per_s"] > 0 for r in rows)
    if script == "bench_loader.py" and not ffcv_skip_reason():
        assert row["images_per_s_ffcv_t2"] > 0 and row["pixel_mad_ffcv_vs_reference"] >= 0

