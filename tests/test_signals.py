"""SIGTERM (as a scheduler or `kill` sends it) stops `nonn` with a non-zero exit, and the rerun resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # the whole pipeline or real processes: `pytest -m 'not slow'` skips it


def test_sigterm_exits_non_zero_and_the_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", "teacher", "--config", str(TINY), "--run-dir", str(run_dir),
           "--teacher.epochs", "6"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run_dir / "teacher" / "last.ckpt"
    while not last.exists() and proc.poll() is None:  # stop it once an epoch is saved
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out[-2000:], err[-2000:])
    assert "nonn: stopped by SIGTERM" in err
    assert not (run_dir / "stages" / "teacher.json").exists(), "an unfinished stage is not marked done"
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stdout
    assert (run_dir / "stages" / "teacher.json").exists()
