"""Progress when the output is not a terminal: whole lines, no carriage-return refreshes, one a
report (trainers) or one a period (other loops), and a final one."""
import io
import os
import subprocess
import sys

from beitfast.progress import PlainProgress, plain_wanted, progress_bar
from tests.conftest import ROOT


def test_plain_progress_writes_whole_lines_on_a_timer_or_at_reports():
    f = io.StringIO()
    for _ in PlainProgress(range(5), desc="loop", unit="img", file=f, every_s=0):
        pass
    bar = PlainProgress(range(5), desc="loop", unit="img", file=f, every_s=0)
    list(bar)
    bar.close()
    lines = f.getvalue().splitlines()
    assert "\r" not in f.getvalue() and len(lines) == 10 + 1  # 5 + 5 updates, the closed one's final line
    assert lines[4].startswith("[loop] 5/5 img (100.0%)") and "img/s" in lines[4] and "elapsed 0:00:00" in lines[4]
    f = io.StringIO()
    bar = PlainProgress(total=100, initial=40, desc="pretrain", unit="step", file=f, every_s=3600)
    for i in range(60):
        bar.update()
        if (i + 1) % 20 == 0:
            bar.set_postfix(loss=1.5, img_s=300.0)
    bar.close()
    lines = f.getvalue().splitlines()  # the reports only (an hour's timer never fires), then the end
    assert len(lines) == 4 and lines[0].startswith("[pretrain] 60/100 step (60.0%)") and "ETA" in lines[0]
    assert lines[-1].endswith("loss=1.5 img_s=300.0") and lines[-2].startswith("[pretrain] 100/100")
    g = io.StringIO()
    PlainProgress(total=3, file=g).write("[finetune] epoch 1: top-1 50%")  # tqdm.write, as the trainers call it
    assert g.getvalue() == "[finetune] epoch 1: top-1 50%\n"
    g = io.StringIO()
    bar = PlainProgress(total=10, file=g, every_s=0)
    bar.set_postfix(loss=2.0)
    bar.update(3)  # a loop that reports prints at its reports only, whatever the timer
    assert len(g.getvalue().splitlines()) == 1
    quiet = io.StringIO()
    bar = PlainProgress(range(3), file=quiet, disable=True)
    list(bar)
    bar.close()
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_bar_and_the_switch_forces_either(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("BEITFAST_PROGRESS", raising=False)
    assert not plain_wanted(Tty()) and plain_wanted(io.StringIO())
    assert type(progress_bar(total=3, file=Tty())).__name__ == "tqdm"
    monkeypatch.setenv("BEITFAST_PROGRESS", "plain")
    assert isinstance(progress_bar(total=3, file=Tty()), PlainProgress)
    monkeypatch.setenv("BEITFAST_PROGRESS", "bar")
    assert not plain_wanted(io.StringIO())


def test_a_redirected_cli_log_has_lines_not_refreshes(tmp_path):
    env = dict(os.environ, BEITFAST_PROGRESS_EVERY="0")
    env.pop("BEITFAST_PROGRESS", None)
    with open(tmp_path / "log.txt", "w") as log:
        r = subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_toy_imagenet.py"), "--out",
                            str(tmp_path / "toy"), "--classes", "2", "--per-class", "3", "--val-per-class", "1"],
                           stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    assert r.returncode == 0
    text = (tmp_path / "log.txt").read_text()
    lines = [x for x in text.splitlines() if x.startswith("[toy imagenet")]
    assert "\r" not in text and len(lines) == 8 + 1 and "8/8 img (100.0%)" in lines[-1], text
