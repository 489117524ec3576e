"""What the distillation step's remaining speed options buy on this machine: the teacher's share of a
NoNN K=2 step, the step under torch.compile, the teacher's forward in bf16 autocast, and the two
students' backbones run as one grouped network (each convolution with groups=K: the same arithmetic in
half the operator calls).

    python benchmarks/bench_step_options.py [--steps 20]
    python benchmarks/bench_step_options.py --grouped [--steps 10]   # the grouped students alone

Standard sizes (WRN-16-2 teacher, 2 x WRN-10-1 students, batch 128, Fashion-MNIST shape, channels_last),
random data: the step's cost does not depend on the pixels. Median over ``--steps`` after warm-up.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from core.hardware import cpu_name
from distill.losses import DistillBatch, build_losses
from students.registry import build_model
from students.unified import UnifiedStudent

BATCH, SHAPE, MEAN, STD = 128, (1, 28, 28), [0.286], [0.353]


def median_ms(fn: Callable[[], object], steps: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds of warm-up, median ms per call)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return warm, statistics.median(times) * 1e3


def nonn_step(compiled: bool) -> tuple[Callable[[], None], Callable[[bool], torch.Tensor]]:
    """A NoNN K=2 training step (teacher under inference mode, KD + per-student filter transfer, SGD),
    and the teacher's forward alone (fp32 or bf16 autocast)."""
    torch.manual_seed(0)
    teacher = build_model("wrn_16_2", 1, 10, MEAN, STD).eval().to(memory_format=torch.channels_last)
    student = UnifiedStudent.build(["wrn_10_1"], [64, 64], 1, 10, MEAN, STD, (7, 7)).to(
        memory_format=torch.channels_last)
    partitions = [torch.arange(0, 128, 2), torch.arange(1, 128, 2)]
    losses = build_losses({"kd": {"alpha": 0.9, "temperature": 4.0}, "filter_transfer_per_student": {"beta": 1e4}})
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.rand(BATCH, *SHAPE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))

    def teacher_out(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = teacher.forward_features(z)
        return fmap, teacher.fc(fmap.mean(dim=(2, 3)))

    def student_out(z: torch.Tensor):
        maps = student.forward_maps(z)
        return maps, student.logits_from_maps(maps)

    t_fn, s_fn = (torch.compile(teacher_out), torch.compile(student_out)) if compiled else (teacher_out, student_out)

    def step() -> None:
        with torch.inference_mode():
            fmap, logits = t_fn(x)
        maps, student_logits = s_fn(x)
        b = DistillBatch(student_logits, logits.clone(), maps, fmap.clone(), partitions, y)
        loss = torch.stack([fn(b) for fn in losses.values()]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def teacher_only(bf16: bool) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return teacher.forward_features(x)

    return step, teacher_only


def grouped(backbone: nn.Module, k: int) -> nn.Module:
    """``backbone`` widened k times with every convolution grouped k ways: k independent copies of it in
    one network, fed the input repeated k times along channels."""
    fused = copy.deepcopy(backbone)
    for module in list(fused.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(module, name, nn.Conv2d(child.in_channels * k, child.out_channels * k, child.kernel_size,
                                                child.stride, child.padding, bias=False, groups=child.groups * k))
            elif isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.BatchNorm2d(child.num_features * k))
    return fused


def backbone_steps(shape: tuple[int, int, int], k: int = 2) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward and backward through k WRN-10-1 backbones one after another, and through the same k as one
    grouped network, on images of ``shape``."""
    torch.manual_seed(0)
    stats = [0.5] * shape[0]
    backbones = [build_model("wrn_10_1", shape[0], 0, stats, stats).to(memory_format=torch.channels_last)
                 for _ in range(k)]
    fused = grouped(backbones[0], k).to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, *shape).contiguous(memory_format=torch.channels_last)

    def separate() -> None:
        torch.stack([b.forward_features(x).square().mean() for b in backbones]).sum().backward()

    def one_grouped() -> None:
        fused.body(fused.normalize(x).repeat(1, k, 1, 1)).square().mean().backward()

    return separate, one_grouped


def grouped_table(steps: int, repeats: int = 2) -> None:
    """Separate / grouped time ratio for both input shapes at 1 and 2 threads, each measured ``repeats``
    times, alternating the two ways (a ratio over 1: the grouped network is faster)."""
    print(f"{cpu_name()}, torch {torch.__version__}, batch {BATCH}, 2 x WRN-10-1 forward + backward\n")
    print("| input | 1 thread | 2 threads |\n|---|---|---|")
    for shape in ((1, 28, 28), (3, 32, 32)):
        cells = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            separate, one_grouped = backbone_steps(shape)
            ratios = [median_ms(separate, steps)[1] / median_ms(one_grouped, steps)[1] for _ in range(repeats)]
            cells.append(", ".join(f"{r:.2f}" for r in ratios))
        print(f"| {' x '.join(map(str, shape))} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grouped", action="store_true", help="only the grouped-students table")
    args = parser.parse_args()
    if args.grouped:
        grouped_table(args.steps)
        return
    step, teacher_only = nonn_step(compiled=False)
    _, eager = median_ms(step, args.steps)
    _, fp32 = median_ms(lambda: teacher_only(False), args.steps)
    _, bf16 = median_ms(lambda: teacher_only(True), args.steps)
    error = float((teacher_only(True).float() - teacher_only(False)).norm() / teacher_only(False).norm())
    compiled_step, _ = nonn_step(compiled=True)
    warm, compiled = median_ms(compiled_step, args.steps)
    separate, one_grouped = backbone_steps(SHAPE)
    _, apart = median_ms(separate, args.steps)
    _, together = median_ms(one_grouped, args.steps)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {BATCH}\n")
    print("| what | ms per batch | images/s |\n|---|---|---|")
    for label, ms in (("NoNN K=2 step, eager fp32", eager), ("teacher forward alone, fp32", fp32),
                      (f"teacher forward alone, bf16 autocast (relative error of its map {error:.1e})", bf16),
                      (f"NoNN K=2 step, torch.compile (warm-up {warm:.0f} s)", compiled),
                      ("2 student backbones, forward + backward, one after another", apart),
                      ("2 student backbones, forward + backward, as one grouped network", together)):
        print(f"| {label} | {ms:.0f} | {BATCH / ms * 1e3:,.0f} |")
    print(f"\nThe teacher's forward is {fp32 / eager:.0%} of the eager step; torch.compile changes the step "
          f"{eager / compiled:.2f}x; bf16 changes the teacher's forward {fp32 / bf16:.2f}x; one grouped "
          f"network changes the students' backbones {apart / together:.2f}x.")


if __name__ == "__main__":
    main()
