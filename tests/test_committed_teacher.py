"""Every committed teacher: its checksum matches its record, and it loads into its architecture."""
from __future__ import annotations

import json

import pytest

from core.io import sha256_file
from distill.checkpoints import load_weights
from students.registry import build_model
from tests.conftest import ROOT

TEACHERS = ROOT / "benchmarks" / "teachers"
CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3}
CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


@pytest.mark.parametrize("record_file", sorted(TEACHERS.glob("*.json")), ids=lambda p: p.stem)
def test_committed_teacher_matches_its_record_and_loads(record_file):
    record = json.loads(record_file.read_text())
    path = TEACHERS / record["file"]
    assert sha256_file(path) == record["sha256"]
    assert 0.5 < record["test_acc"] <= 1.0 and record["arch"] in record["file"]
    channels, classes = CHANNELS[record["dataset"]], CLASSES[record["dataset"]]
    model = build_model(record["arch"], channels, classes, [0.0] * channels, [1.0] * channels)
    load_weights(model, path, "model.", "teacher")  # strict: every weight present, nothing extra


def test_publishing_a_teacher_without_a_test_accuracy_is_refused_before_anything_is_written(tmp_path):
    """A teacher trained with trainer.test: false has no test accuracy to record: one line, no files."""
    import subprocess
    import sys

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "teacher.json").write_text(json.dumps({"results": {"test_acc": None,
                                                                              "best_val_acc": 0.9}}))
    out = tmp_path / "published" / "t.ckpt"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "publish_teacher.py"), str(tmp_path), str(out),
                           "--command", "nonn teacher", "--trained-at", "abc"], capture_output=True, text=True)
    assert done.returncode == 1 and "trainer.test: false" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.parent.exists()
