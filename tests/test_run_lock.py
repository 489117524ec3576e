"""One `nonn` process per run folder: a second one is refused with the holder's PID; a dead holder's lock is taken over."""
from __future__ import annotations

import os
import subprocess
import sys

from core.io import run_lock
from pipeline.cli import main
from tests.conftest import ROOT, TINY


def test_second_process_on_a_run_folder_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        assert main(["partition", "--config", str(TINY), "--run-dir", str(run_dir)]) == 1
        err = capsys.readouterr().err
    assert f"is in use by another nonn process (PID {os.getpid()})" in err
    assert not (run_dir / "config.yaml").exists(), "the refused command wrote nothing"


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                             "from core.io import run_lock; lock = run_lock(Path(sys.argv[1])); "
                             "lock.__enter__(); os._exit(0)", str(run_dir)], cwd=ROOT, check=True)
    assert holder.returncode == 0 and (run_dir / ".lock").read_text().strip().isdigit()  # died holding it
    with run_lock(run_dir):
        assert (run_dir / ".lock").read_text() == str(os.getpid())
