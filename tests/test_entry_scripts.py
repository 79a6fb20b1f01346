"""Every entry script runs from a bare checkout, from any directory: `--help` of each, with the
editable install hidden (`python -S` skips the .pth file that `pip install -e .` wrote; the
third-party packages stay on PYTHONPATH), from a directory outside the repository."""
import site
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def entry_scripts() -> list[Path]:
    """The Python files with a `__main__` block under beitfast/, data_prep/ and benchmarks/."""
    out = []
    for d in ("beitfast", "data_prep", "benchmarks"):
        out += [p for p in sorted((ROOT / d).glob("*.py")) if '__name__ == "__main__"' in p.read_text()]
    return out


def _bare(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(site.getsitepackages()), "HOME": str(cwd),
           "PYTHON": f"{sys.executable} -S"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_editable_install_is_really_hidden(tmp_path):
    """The check below means something only if `import beitfast` fails in that setting."""
    r = _bare([sys.executable, "-S", "-c", "import beitfast"], tmp_path)
    assert r.returncode != 0 and "No module named 'beitfast'" in r.stderr, r.stderr


def test_every_entry_script_runs_from_a_bare_checkout(tmp_path):
    scripts = entry_scripts()
    names = {p.relative_to(ROOT).as_posix() for p in scripts}
    assert {"beitfast/train.py", "beitfast/finetune.py", "beitfast/segment.py", "data_prep/tokenize_imagenet.py",
            "benchmarks/bench_train.py"} <= names, names
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda p: _bare([sys.executable, "-S", str(p), "--help"], tmp_path), scripts))
    failed = {p.relative_to(ROOT).as_posix(): (r.stderr or r.stdout).strip().splitlines()[-1:]
              for p, r in zip(scripts, runs) if r.returncode != 0 or "usage" not in r.stdout.lower()}
    assert not failed, failed
    r = _bare(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--help"], tmp_path)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stdout + r.stderr
