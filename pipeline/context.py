"""The run a command works on: its resolved config, its folder, and whether --force was given."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagedata.data import ImageDataModule


@dataclass
class Context:
    config: dict
    run_dir: Path
    force: bool = False

    @property
    def progress(self) -> bool:
        return bool(self.config["trainer"]["progress_bar"])

    def stage_record_path(self, stage: str) -> Path:
        return self.run_dir / "stages" / f"{stage}.json"

    def datamodule(self) -> ImageDataModule:
        dm = ImageDataModule(self.config["data"], self.config["seed"])
        dm.setup()
        return dm

    def teacher_path(self) -> Path:
        given = self.config["teacher"]["checkpoint"]
        return Path(given) if given else self.run_dir / "teacher" / "best.ckpt"
