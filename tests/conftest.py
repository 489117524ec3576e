"""Shared fixtures: a tiny synthetic config and a run folder per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"

os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def crash_in_second_epoch(monkeypatch):
    """Make a LightningModule class raise at the end of its second training epoch (a killed run);
    ``monkeypatch.undo()`` lets the next run go through."""
    def install(module_class: type) -> None:
        def crash(self):
            if self.current_epoch == 1:
                raise RuntimeError("simulated crash")
        monkeypatch.setattr(module_class, "on_train_epoch_end", crash, raising=False)
    return install


@pytest.fixture
def tiny_config(tmp_path: Path) -> dict:
    """The synthetic profile, seeded, writing into this test's own run folder."""
    config = load_config(TINY)
    config["run_dir"] = str(tmp_path / "run")
    return config
