"""Weights & Biases tracking that never needs an account and never kills a run.

Without an API key runs go to offline mode (``<run-dir>/wandb/``, ``wandb sync`` later). Every call
into wandb is guarded: a tracking failure prints one warning and the stage goes on untracked.
"""
from __future__ import annotations

import csv
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from distill.ranks import is_worker

WANDB_MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    """``auto`` -> online when an API key is configured, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _warn(what: str, error: BaseException) -> None:
    warnings.warn(f"W&B {what} failed ({type(error).__name__}: {error}); continuing without it", stacklevel=3)


class Tracker:
    """One W&B run per stage (group = run name, job_type = stage), or nothing when disabled or broken."""

    def __init__(self, config: dict, run_dir: Path, stage: str) -> None:
        self.run: Any = None
        wb = config["wandb"]
        mode = resolve_mode(wb["mode"])
        if mode == "disabled" or is_worker():  # rank 0 alone tracks a data-parallel run
            return
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=wb["project"], entity=wb["entity"], group=config["name"], job_type=stage,
                                  name=f"{config['name']}-{stage}", dir=str(run_dir), mode=mode, config=config,
                                  reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop the stage
            _warn("init", e)

    def log(self, metrics: dict) -> None:
        self._call("log", lambda: self.run.log(metrics))

    def log_image(self, key: str, path: Path) -> None:
        def go() -> None:
            import wandb
            self.run.log({key: wandb.Image(str(path))})
        self._call("image logging", go)

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        def go() -> None:
            import wandb
            artifact = wandb.Artifact(name, type=kind)
            artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self._call("artifact logging", go)

    def summary(self, values: dict) -> None:
        self._call("summary", lambda: self.run.summary.update(values))

    def finish(self) -> None:
        self._call("finish", lambda: self.run.finish())
        self.run = None

    def _call(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            _warn(what, e)
            self.run = None


class SafeWandbLogger(WandbLogger):
    """Lightning's WandbLogger over our run, with every write guarded."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        try:
            super().log_metrics(metrics, step)
        except Exception as e:  # noqa: BLE001
            _warn("metric logging", e)

    def log_hyperparams(self, params: Any) -> None:
        try:
            super().log_hyperparams(params)
        except Exception as e:  # noqa: BLE001
            _warn("hyperparameter logging", e)


class ResumedCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps the rows of the
    epochs it does not redo (``epoch <= last_epoch``), so the history survives an interruption."""

    def __init__(self, *args: Any, last_epoch: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_epoch = last_epoch

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept: list[dict] = []
        if path.is_file():
            with open(path, newline="") as f:
                kept = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)
                        if row.get("epoch", "").isdigit() and int(row["epoch"]) <= self.last_epoch]
        writer = super().experiment
        if hasattr(writer, "metrics"):  # rank 0's writer (other ranks get a dummy)
            writer.metrics[:0] = kept
        return writer


def lightning_loggers(tracker: Tracker, stage_dir: Path, resumed_epoch: int | None = None) -> list[Logger]:
    """A local CSV log always (continued when resuming after ``resumed_epoch``); W&B when the tracker has a run."""
    options = {"save_dir": str(stage_dir), "name": "logs", "version": ""}
    csv_logger = (CSVLogger(**options) if resumed_epoch is None
                  else ResumedCSVLogger(**options, last_epoch=resumed_epoch))
    loggers: list[Logger] = [csv_logger]
    if tracker.run is not None:
        loggers.append(SafeWandbLogger(experiment=tracker.run))
    return loggers
