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


def test_sigterm_outside_the_trainer_is_reported_as_such(tmp_path, monkeypatch, capsys):
    """A SIGTERM that a stage unwinds from itself (the teacher-pool build) exits 143 with the same message
    as the Trainer's, not with a traceback."""
    import pipeline.stages
    from core.signals import Terminated
    from pipeline.cli import main

    def terminated(ctx, stage):
        raise Terminated()
    monkeypatch.setattr(pipeline.stages, "run_stage", terminated)
    assert main(["distill", "--config", str(TINY), "--run-dir", str(tmp_path / "run")]) == 143
    assert "nonn: stopped by SIGTERM; finished epochs are kept" in capsys.readouterr().err
