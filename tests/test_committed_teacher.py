"""The committed standard teacher: its checksum matches its record, and the configs that name it load it."""
from __future__ import annotations

import json

from distill.io import sha256_file
from students.registry import build_model
from distill.checkpoints import load_weights
from tests.conftest import ROOT

TEACHERS = ROOT / "benchmarks" / "teachers"


def test_committed_teacher_matches_its_record_and_loads():
    record = json.loads((TEACHERS / "fmnist-wrn_16_2.json").read_text())
    path = TEACHERS / record["file"]
    assert sha256_file(path) == record["sha256"]
    assert record["test_acc"] >= 0.94 and record["arch"] == "wrn_16_2"
    model = build_model(record["arch"], 1, 10, [0.0], [1.0])
    load_weights(model, path, "model.", "teacher")  # strict: every weight present, nothing extra
