"""W&B: offline without an account, and never fatal; and nothing else printed that a user must wade through."""
from __future__ import annotations

import pytest

from distill.tracking import Tracker, resolve_mode


def test_auto_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


def test_offline_run_folder_appears(tiny_config, tmp_path):
    tiny_config["wandb"]["mode"] = "offline"
    run_dir = tmp_path / "run"
    tracker = Tracker(tiny_config, run_dir, "teacher")
    assert tracker.run is not None
    tracker.log({"x": 1.0})
    tracker.finish()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_tracking_failure_only_warns(tiny_config, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise ConnectionError("wandb is down")
    monkeypatch.setattr(wandb, "init", broken_init)
    tiny_config["wandb"]["mode"] = "offline"
    with pytest.warns(UserWarning, match="W&B init failed"):
        tracker = Tracker(tiny_config, tmp_path, "teacher")
    assert tracker.run is None
    tracker.log({"x": 1})  # a no-op, not an error
    tracker.finish()


def test_failing_log_call_disables_tracking(tiny_config, tmp_path):
    class Exploding:
        def log(self, metrics):
            raise OSError("disk full")
    tiny_config["wandb"]["mode"] = "disabled"
    tracker = Tracker(tiny_config, tmp_path, "teacher")
    tracker.run = Exploding()
    with pytest.warns(UserWarning, match="W&B log failed"):
        tracker.log({"x": 1})
    assert tracker.run is None


def test_lightnings_litlogger_advert_is_not_printed(caplog):
    """Every Trainer (three per run) printed an advert for a hosted logger into the user's log."""
    import logging

    import pytorch_lightning as pl

    from pipeline.cli import quiet_known_noise

    quiet_known_noise()
    with caplog.at_level(logging.INFO):
        pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    printed = caplog.text
    assert "litlogger" not in printed
    assert "GPU available" in printed, "Lightning's other messages still print"
