"""Teacher stage with a real Lightning Trainer on synthetic data: checkpoints, resume, skip, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.checkpoints import CheckpointError
from distill.modules import TeacherModule
from pipeline.cli import main
from pipeline.context import Context
from pipeline.loading import load_teacher
from pipeline.stages import run_stage

pytestmark = pytest.mark.slow  # the whole pipeline or real processes: `pytest -m 'not slow'` skips it


def test_teacher_trains_is_interrupted_and_resumes(tiny_config, crash_in_second_epoch, monkeypatch, capsys):
    ctx = Context(tiny_config, Path(tiny_config["run_dir"]))
    tiny_config["teacher"]["epochs"] = 3
    crash_in_second_epoch(TeacherModule)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(ctx, "teacher")
    assert (ctx.run_dir / "teacher" / "last.ckpt").exists()
    assert not ctx.stage_record_path("teacher").exists(), "an interrupted stage is not marked done"

    monkeypatch.undo()
    results = run_stage(ctx, "teacher")
    assert "resuming from" in capsys.readouterr().out
    last = torch.load(ctx.run_dir / "teacher" / "last.ckpt", weights_only=True)
    batches_per_epoch = (tiny_config["data"]["synthetic"]["train_size"] - tiny_config["data"]["val_size"]) // \
        tiny_config["data"]["batch_size"]
    assert last["epoch"] == 2 and last["global_step"] == 3 * batches_per_epoch
    assert (ctx.run_dir / "teacher" / "best.ckpt").exists() and results["test_acc"] >= 0.5  # chance: 0.25
    saved = (ctx.run_dir / "config.yaml").read_text()
    assert "seed: 0" in saved and "epochs: 3" in saved
    assert (ctx.run_dir / "teacher" / "logs" / "metrics.csv").exists()


def test_finished_stage_is_skipped_unless_forced_or_changed(tiny_config, capsys):
    ctx = Context(tiny_config, Path(tiny_config["run_dir"]))
    tiny_config["teacher"]["epochs"] = 1
    run_stage(ctx, "teacher")
    stamp = (ctx.run_dir / "teacher" / "best.ckpt").stat().st_mtime_ns
    run_stage(ctx, "teacher")
    assert "up to date" in capsys.readouterr().out
    assert (ctx.run_dir / "teacher" / "best.ckpt").stat().st_mtime_ns == stamp
    ctx.force = True
    run_stage(ctx, "teacher")
    assert (ctx.run_dir / "teacher" / "best.ckpt").stat().st_mtime_ns != stamp


def test_a_stage_that_fails_leaves_config_yaml_describing_the_last_success(tiny_config, capsys):
    """config.yaml changes only when the stages it describes succeed."""
    run_dir = Path(tiny_config["run_dir"])
    args = ["teacher", "--config", "configs/synthetic/tiny.yaml", "--run-dir", str(run_dir), "--teacher.epochs", "1"]
    assert main(args) == 0
    before = (run_dir / "config.yaml").read_text()
    assert main([*args, "--force", "--data.batch_size", "100000"]) == 1
    assert "data.batch_size = 100000 is more than the 384 training images" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == before


def test_bad_teacher_checkpoints_give_clear_errors(tiny_config, tmp_path):
    ctx = Context(tiny_config, Path(tiny_config["run_dir"]))
    dm = ctx.datamodule()
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"definitely not a checkpoint")
    tiny_config["teacher"]["checkpoint"] = str(corrupt)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_teacher(ctx, dm)
    wrong = tmp_path / "wrong.ckpt"
    from students.registry import build_model
    torch.save({"state_dict": {f"model.{k}": v for k, v in build_model("resnet20", 1, 4, [0.5], [0.2]).state_dict()
                               .items()}}, wrong)
    tiny_config["teacher"]["checkpoint"] = str(wrong)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_teacher(ctx, dm)
    tiny_config["teacher"]["checkpoint"] = str(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(ctx, dm)


def test_cli_reports_bad_config_in_one_line(capsys, tmp_path):
    assert main(["teacher", "--config", "configs/synthetic/tiny.yaml", "--teacher.epochz", "2",
                 "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'teacher.epochz'" in err
    assert main(["distill", "--config", "configs/synthetic/tiny.yaml", "--run-dir", str(tmp_path / "r")]) == 1
    assert "needs 'partition' first" in capsys.readouterr().err


def test_unknown_architecture_in_config_is_a_clear_cli_error(capsys, tmp_path):
    assert main(["teacher", "--config", "configs/synthetic/tiny.yaml", "--teacher.arch", "wrn_7_7",
                 "--run-dir", str(tmp_path)]) == 2  # a config error: refused before any stage starts
    assert not (tmp_path / "config.yaml").exists()
    assert "unknown architecture 'wrn_7_7'" in capsys.readouterr().err


def test_corrupt_last_checkpoint_names_the_file_and_the_fix(tmp_path):
    from distill.checkpoints import checkpoint_epoch

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last.ckpt: corrupt or unreadable teacher last checkpoint .*--force"):
        checkpoint_epoch(bad, "teacher last")
