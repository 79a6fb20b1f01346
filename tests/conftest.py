import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # data_prep/ and benchmarks/ are scripts, not packages
if not torch.cuda.is_available():  # kernels run in Triton's interpreter; on a GPU, compiled for real
    os.environ.setdefault("TRITON_INTERPRET", "1")


def ffcv_skip_reason() -> str | None:
    """Why FFCV is unavailable (written by scripts/setup_env.sh), or None."""
    marker = Path(sys.prefix) / "ffcv-unavailable.txt"
    if marker.exists():
        return "FFCV unavailable: " + marker.read_text().strip()
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        return f"FFCV not importable: {e}"
    return None


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy ImageNet with every oddity, corrupt files included."""
    from data_prep.make_toy_imagenet import make

    out = tmp_path_factory.mktemp("toy") / "imagenet"
    make(out, classes=4, per_class=30, val_per_class=5, seed=1, corrupt=True, progress=False)
    return out
