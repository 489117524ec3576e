"""benchmarks/profile_epoch.py: the per-epoch cost table, live teacher beside the pool, at two precisions."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY


@pytest.mark.slow
def test_one_column_per_setting_and_each_pool_built_once_for_all_its_precisions(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_epoch.py"), "--config", str(TINY),
                           "--run-dir", str(tmp_path / "run"), "--views", "0", "2", "--epochs", "1",
                           "--precisions", "32-true", "bf16-mixed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| per epoch"))
    assert header.split(" | ")[1:] == ["live teacher, 32-true", "live teacher, bf16-mixed", "pool, V = 2, 32-true",
                                       "pool, V = 2, bf16-mixed |"]
    cells = next(line for line in lines if line.startswith("| pool build")).strip("| ").split(" | ")[1:]
    assert cells[:2] == ["-", "-"] and cells[2].endswith("MiB") and cells[3] == "(the same pool)"
    # the pool's columns never call the teacher (the live ones' time is not asserted: on generated 16 px images
    # it rounds to 0.0 s on a fast machine)
    teacher = next(line for line in lines if line.startswith("| teacher forward")).strip(" |").split(" | ")[1:]
    assert teacher[2:] == ["0.0 s (0%)", "0.0 s (0%)"]
