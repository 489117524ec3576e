"""How a training stage trains: the Lightning Trainer with best/last checkpoints, resuming from the
true last epoch, and a fresh folder that replaces the finished result only on success."""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.profilers import SimpleProfiler

from core.io import restore_interrupted_swap, swap_in, write_json_atomic, write_text_atomic
from distill.checkpoints import checkpoint_epoch
from distill.precision import resolve_precision
from distill.ranks import is_worker, sync_processes
from distill.tracking import Tracker, lightning_loggers
from imagedata.data import ImageDataModule
from pipeline.context import Context
from pipeline.records import fingerprint


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class FiniteLoss(pl.Callback):
    """Stop a training stage whose loss stops being finite: what it would train is garbage, and the
    stage's previous result must survive it (the fresh folder is never swapped in)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLoss(f"{self.stage}: the training loss became {float(loss):.4g} at epoch "
                                     f"{trainer.current_epoch}, batch {batch_idx}; lower the learning rate or check "
                                     "the loss options (the previous result, if any, is kept)")


def fit(ctx: Context, stage_dir: Path, module: pl.LightningModule, dm: ImageDataModule, epochs: int,
         tracker: Tracker, stage: str) -> tuple[pl.Trainer, ModelCheckpoint, int]:
    """Fit with best/last checkpoints in ``stage_dir``; resume from last.ckpt if it is this run's.
    Returns the trainer, the best-checkpoint callback and how many epochs this call trained."""
    marker = stage_dir / "fingerprint.txt"
    current = fingerprint(ctx, stage)
    last = stage_dir / "last.ckpt"
    resume = (not ctx.force and last.exists() and marker.exists() and marker.read_text() == current)
    resumed_epoch = checkpoint_epoch(last, f"{stage} last") if resume else None
    sync_processes()  # every process decides on resuming before rank 0 touches the folder
    if not is_worker():  # rank 0 alone prepares the folder
        if not resume and stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, current)
    checkpoint = ModelCheckpoint(dirpath=stage_dir, filename="best", monitor="val/acc", mode="max",
                                 save_top_k=1, enable_version_counter=False)
    # every epoch, improved or not, so that a killed run resumes from its true last epoch
    every_epoch = ModelCheckpoint(dirpath=stage_dir, filename="last", monitor=None, save_top_k=1,
                                  enable_version_counter=False)
    tc = ctx.config["trainer"]
    profiler = SimpleProfiler(dirpath=stage_dir, filename="profile") if tc["profile"] else None
    trainer = pl.Trainer(max_epochs=epochs, accelerator=tc["accelerator"], devices=tc["processes"],
                         strategy=tc["strategy"], num_nodes=tc["num_nodes"],
                         precision=resolve_precision(tc["precision"], tc["accelerator"]),
                         deterministic=tc["deterministic"], logger=lightning_loggers(tracker, stage_dir, resumed_epoch),
                         callbacks=[checkpoint, every_epoch, FiniteLoss(stage)], enable_progress_bar=ctx.progress,
                         enable_model_summary=False, limit_train_batches=tc["limit_train_batches"],
                         limit_val_batches=tc["limit_val_batches"], num_sanity_val_steps=0, log_every_n_steps=10,
                         default_root_dir=str(stage_dir), profiler=profiler)
    if resume:
        print(f"[nonn] {stage}: resuming from {last}")
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    if profiler is not None and not is_worker():
        write_json_atomic(stage_dir / "profile.json", {action: {"seconds": round(sum(d), 3), "calls": len(d)}
                                                        for action, d in profiler.recorded_durations.items()})
    return trainer, checkpoint, epochs - (resumed_epoch + 1 if resume else 0)


STAGE_DIRS = {"teacher": "teacher", "distill": "students"}


def work_dir(ctx: Context, stage: str, final: Path) -> Path:
    """Where a training stage trains: its own folder when that holds a run of this very config (to
    resume) or no finished result; otherwise a folder beside it that replaces it only on success, so
    a changed config or --force never costs the last good result before the new one exists."""
    if not is_worker():
        restore_interrupted_swap(final)
    marker = final / "fingerprint.txt"
    same_run = not ctx.force and marker.exists() and marker.read_text() == fingerprint(ctx, stage)
    if same_run or not (final / "best.ckpt").exists():
        return final
    return final.parent / f".{final.name}.next"


def train_and_test(ctx: Context, tracker: Tracker, stage: str, module: pl.LightningModule, dm: ImageDataModule,
                    epochs: int, what: str) -> tuple[Path, dict]:
    """Fit, then test the best checkpoint (validation picked it; the test set is only reported), unless
    ``trainer.test`` is off: a run that chooses by validation never reads the test set (test_acc None)."""
    final = ctx.run_dir / STAGE_DIRS[stage]
    work = work_dir(ctx, stage, final)
    start = time.perf_counter()
    trainer, checkpoint, fit_epochs = fit(ctx, work, module, dm, epochs, tracker, stage)
    fit_seconds = time.perf_counter() - start
    acc = None
    if ctx.config["trainer"]["test"]:
        tested = trainer.test(module, datamodule=dm, ckpt_path=str(work / "best.ckpt"), verbose=False,
                              weights_only=True)
        acc = float(tested[0]["test/acc"])
        tracker.summary({f"{stage}/test_acc": acc})
    if work != final and not is_worker():
        swap_in(work, final)  # the previous result is removed only now that its replacement is complete
    sync_processes()
    best = final / "best.ckpt"
    score = float(checkpoint.best_model_score)
    shown = (f"test accuracy {acc:.4f}" if acc is not None
             else f"best validation accuracy {score:.4f} (trainer.test: false)")
    print(f"[nonn] {stage}: {what} {shown} ({best})")
    return best, {"test_acc": acc, "best_val_acc": score, "epochs": epochs,
                  "precision": str(trainer.precision), "fit_seconds": round(fit_seconds, 1), "fit_epochs": fit_epochs,
                  # the process's peak resident memory so far (Linux reports KiB), data and any pool pages included
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
