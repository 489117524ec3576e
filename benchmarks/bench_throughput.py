"""Throughput on this machine: the in-memory loader vs a training step, and a NoNN distillation step
under Lightning vs a hand-written PyTorch loop doing the same work on the same models and data.

    python benchmarks/bench_throughput.py [--steps 30] [--out benchmarks/results_throughput.md]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import pytorch_lightning as pl
import torch

from distill.losses import DistillBatch
from distill.modules import NoNNModule
from imagedata.data import ImageDataModule, Sampling, TensorBatches
from pipeline.config import load_config
from students.registry import build_model
from students.unified import UnifiedStudent

BATCH = 128


def loader_throughput(dm: ImageDataModule) -> float:
    loader = dm.train_dataloader()
    start, seen = time.perf_counter(), 0
    for _x, y in loader:
        seen += len(y)
    return seen / (time.perf_counter() - start)


def teacher_step_throughput(batches: list, steps: int) -> float:
    model = build_model("wrn_16_2", 1, 10, [0.286], [0.353]).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    timings = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        timings.append(time.perf_counter() - t)
    return BATCH / statistics.median(timings[3:])


def make_nonn(channels_last: bool) -> NoNNModule:
    torch.manual_seed(0)
    teacher = build_model("wrn_16_2", 1, 10, [0.286], [0.353]).eval()
    parts = [list(range(0, 64)), list(range(64, 128))]
    student = UnifiedStudent.build(["wrn_10_1"], [64, 64], 1, 10, [0.286], [0.353], (7, 7))
    cfg = load_config("configs/fashion_mnist/standard.yaml")["distill"]
    return NoNNModule(teacher, student, parts, cfg["losses"], cfg, 10, channels_last=channels_last)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.timings: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.timings.append(time.perf_counter() - self._t)


def lightning_nonn(batches: list, steps: int, channels_last: bool, precision: str, deterministic: bool = False) -> float:
    module = make_nonn(channels_last)
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         limit_val_batches=0, precision=precision, deterministic=deterministic)
    loader = TensorBatches(torch.cat([b[0] for b in batches]).mul(255).to(torch.uint8),
                           torch.cat([b[1] for b in batches]), BATCH, Sampling(shuffle=True, drop_last=True))
    trainer.fit(module, train_dataloaders=loader)
    return BATCH / statistics.median(timer.timings[3:])


def plain_nonn(batches: list, steps: int) -> float:
    """The same forward/backward as NoNNModule.training_step, written by hand."""
    module = make_nonn(channels_last=True)
    module.to(memory_format=torch.channels_last)
    student, teacher = module.student.train(), module.teacher
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    timings = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t = time.perf_counter()
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            tmap = teacher.forward_features(x)
            tlogits = teacher.fc(tmap.mean(dim=(2, 3)))
        tmap, tlogits = tmap.clone(), tlogits.clone()
        maps = student.forward_maps(x)
        logits = student.logits_from_maps(maps)
        b = DistillBatch(logits, tlogits, maps, tmap, module.partitions, y)
        loss = sum(loss_fn(b) for loss_fn in module.losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        timings.append(time.perf_counter() - t)
    return BATCH / statistics.median(timings[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = ImageDataModule(load_config("configs/fashion_mnist/standard.yaml")["data"], seed=0)
    dm.setup()
    batches = [b for _, b in zip(range(16), dm.train_dataloader())]
    rows = [("in-memory loader, Fashion-MNIST train split, crop+flip", f"{loader_throughput(dm):,.0f}"),
            ("teacher WRN-16-2 training step (plain PyTorch, channels_last)",
             f"{teacher_step_throughput(batches, args.steps):,.0f}")]
    plain, lightning, lightning_bf16, lightning_nchw, deterministic = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved so that background load hits both alike
        plain.append(plain_nonn(batches, args.steps))
        lightning.append(lightning_nonn(batches, args.steps, True, "32-true"))
        lightning_nchw.append(lightning_nonn(batches, args.steps, False, "32-true"))
        lightning_bf16.append(lightning_nonn(batches, args.steps, True, "bf16-mixed"))
        deterministic.append(lightning_nonn(batches, args.steps, True, "32-true", deterministic=True))
    p, l_ = max(plain), max(lightning)
    rows += [("NoNN K=2 step, plain PyTorch loop (WRN-16-2 teacher, 2x WRN-10-1)", f"{p:,.0f}"),
             ("NoNN K=2 step, NoNNModule + Lightning Trainer, fp32 channels_last", f"{l_:,.0f} ({l_ / p:.2f}x plain)"),
             ("NoNN K=2 step, Lightning, fp32 NCHW", f"{max(lightning_nchw):,.0f}"),
             ("NoNN K=2 step, Lightning, bf16-mixed channels_last", f"{max(lightning_bf16):,.0f}"),
             ("NoNN K=2 step, Lightning, fp32 channels_last, deterministic algorithms", f"{max(deterministic):,.0f}")]
    table = ["| what | images/s |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    header = (f"Batch {BATCH}, best of {args.repeats} interleaved repeats of the median step over {args.steps} steps; "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
