"""Teacher-output pool build throughput (issue 19): ``distill.pool.build_pool`` on random images of a data
set's shape, with the maps of every final-layer filter stored, as NoNN's filter transfer reads them.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pool_build.py --images 4096 --repeats 2

Run it at two commits side by side (one after the other, twice) to compare builds on one machine.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from core.hardware import cpu_name
from distill.pool import build_pool
from students.registry import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="wrn_16_2")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128, help="the pipeline builds at data.batch_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels = args.shape[0]
    teacher = build_model(args.arch, channels, 10, [0.5] * channels, [0.25] * channels)
    filters = list(range(teacher.fc.in_features))
    images = (torch.rand(args.images, *args.shape) * 255).to(torch.uint8)
    key = {"views": args.views, "filters": filters, "seed": 0, "crop_padding": 2, "hflip": True}
    rates = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build_pool(Path(tmp) / "pool", key, teacher, images, args.batch_size, True, False)
            rates.append(args.images * args.views / (time.perf_counter() - start))
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
          f"{args.arch} pool build, {args.images} images x {args.views} views, {len(filters)} filters' maps, "
          f"batch {args.batch_size}: median {statistics.median(rates):.0f} img/s (runs: "
          f"{', '.join(f'{r:.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
