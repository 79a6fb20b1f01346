"""Each benchmark's tiny mode runs, so the scripts cannot rot; figures are not asserted
beyond being present and positive (speed is a benchmark's business, not a test's)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("script,keys", [
    ("bench_masking.py", ["numba_masks_per_s", "reference_masks_per_s", "speedup", "batch2048_ms"]),
    ("bench_tokenizer.py", ["dalle_fp32_images_per_s", "dalle_bf16_images_per_s", "dalle_gflop_per_image",
                           "dalle_bf16_agreement", "dvae_tiny_bf16_agreement", "dvae_tiny_images_per_s"]),
    ("bench_tokenize.py", ["dvae_tiny_views_per_s", "dalle_images_per_s", "online_dalle_ms_per_step_b128",
                          "rss_growth_4x_data"]),
    ("bench_loader.py", ["images_per_s_reference_t2", "images_per_s_dali_t2", "ratio_dali_vs_reference_t2",
                        "pixel_mad_dali_vs_reference", "step_images_per_s", "together_images_per_s_dali",
                        "jitter_mad_vs_whole_image"]),
    ("bench_train.py", ["images_per_s_reference", "images_per_s_+cache", "images_per_s_+dali",
                       "images_per_s_+kernels", "images_per_s_+nosync", "images_per_s_beitfast",
                       "ratio_beitfast_vs_reference", "vit_gflop_per_image", "tokenizer_gflop_per_image"]),
    ("bench_kernels.py", ["layernorm_torch_ms", "residual_torch_ms", "head_torch_ms", "head_chunked_ms"]),
    ("bench_model.py", ["images_per_s", "mfu", "matmul_peak_tflops"]),
])
def test_benchmark_tiny_mode(script, keys):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    for k in keys:
        assert row[k] > 0, k
    assert row["machine"]["cores"] >= 1
