"""Data-parallel training with Lightning DDP on 2 CPU processes (gloo), through the real `nonn` command:
each rank trains on its own shard, and the metrics and checkpoints are those of the whole data."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.loading import load_teacher
from students.networks import batched
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # the whole pipeline or real processes: `pytest -m 'not slow'` skips it

DDP = ["--trainer.strategy", "ddp", "--trainer.processes", "2", "--trainer.accelerator", "cpu",
       "--trainer.num_threads", "1"]


def nonn(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(var, None)  # a fresh launch, whatever the test process carries
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    for stage in ("teacher", "partition", "distill"):
        done = nonn(stage, "--config", str(TINY), "--run-dir", str(run_dir), *DDP)
        assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("stage_dir", ["teacher", "students"])
def test_each_rank_trains_on_its_own_shard(ddp_run, stage_dir):
    config = load_config(TINY)
    train_images = config["data"]["synthetic"]["train_size"] - config["data"]["val_size"]
    per_rank_steps = (train_images // 2) // config["data"]["batch_size"]
    last = torch.load(ddp_run / stage_dir / "last.ckpt", map_location="cpu", weights_only=True)
    epochs = config["teacher" if stage_dir == "teacher" else "distill"]["epochs"]
    # a rank that read the whole training split would have taken twice as many steps
    assert last["global_step"] == epochs * per_rank_steps


def test_test_accuracy_is_that_of_the_whole_test_set(ddp_run):
    """The teacher's test accuracy from two processes equals one process scoring every test image."""
    config = load_config(TINY)
    config["run_dir"] = str(ddp_run)
    ctx = Context(config, ddp_run)
    dm = ctx.datamodule()
    teacher, _ = load_teacher(ctx, dm)
    images, labels = dm.test[0].float().div(255.0), dm.test[1]
    accuracy = float((batched(teacher, images).argmax(1) == labels).float().mean())
    record = json.loads((ddp_run / "stages" / "teacher.json").read_text())
    assert record["results"]["test_acc"] == pytest.approx(accuracy, abs=1e-6)


def test_only_rank_zero_writes_the_logs(ddp_run):
    with open(ddp_run / "teacher" / "logs" / "metrics.csv") as f:
        validated = [row["epoch"] for row in csv.DictReader(f) if row["val/acc"]]
    epochs = load_config(TINY)["teacher"]["epochs"]
    assert validated == [str(e) for e in range(epochs)], "one validation row per epoch, not one per process"


def test_the_teacher_pool_under_ddp_is_built_once_and_read_by_every_rank(ddp_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(ddp_run, run_dir)
    done = nonn("distill", "--config", str(TINY), "--run-dir", str(run_dir), *DDP, "--force",
                "--distill.teacher_pool.views", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("teacher pool: building") == 1, "rank 0 builds; the worker waits and reads"
    record = json.loads((run_dir / "stages" / "distill.json").read_text())["results"]
    assert record["teacher_pool"]["views"] == 2
    assert not list(run_dir.glob(".teacher_pool.*.building")), "no half-built pool left behind"
    config = load_config(TINY)
    per_rank_steps = ((config["data"]["synthetic"]["train_size"] - config["data"]["val_size"]) // 2) // \
        config["data"]["batch_size"]
    last = torch.load(run_dir / "students" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == config["distill"]["epochs"] * per_rank_steps  # each rank its own shard
