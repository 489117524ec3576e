"""The learning-rate schedules configure_optimizers builds, read off a real Lightning Trainer step by step."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.modules import SCHEDULES, TeacherModule
from students.registry import build_model

LR = 0.1
EPOCHS, BATCHES = 2, 4

# the rate each of the 8 optimiser steps of 2 epochs x 4 batches ran at
EXPECTED = {
    "cosine": [LR] * 4 + [LR / 2] * 4,  # once per epoch: cos(pi * 1/2) halves the rate for epoch 2
    "cosine_steps": [LR * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)],
    "step": [LR] * 4 + [LR * 0.1] * 4,  # milestones 0.5 and 0.75 of 2 epochs: epochs 1 and 2
}


class _RecordRate(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, *_args) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_schedule_sets_the_rate_of_every_step(schedule: str):
    pl.seed_everything(0)
    model = build_model("wrn_10_1", 1, 4, [0.5], [0.25])
    optim = {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": schedule,
             "milestones": [0.5, 0.75]}
    module = TeacherModule(model, optim, num_classes=4, channels_last=False)
    data = TensorDataset(torch.rand(8 * BATCHES, 1, 8, 8), torch.randint(0, 4, (8 * BATCHES,)))
    rates = _RecordRate()
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rates])
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert rates.rates == pytest.approx(EXPECTED[schedule], rel=1e-6)
