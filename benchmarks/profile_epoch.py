"""Where a distillation epoch goes: the distill stage run under Lightning's SimpleProfiler, with the live
teacher and with the teacher-output pool, side by side in one invocation on one machine, optionally at
several precisions (``--precisions 32-true bf16-mixed``: each pool is built once and serves them all).

    python benchmarks/profile_epoch.py --config configs/fashion_mnist/standard.yaml --views 0 4 \\
        --run-dir /tmp/profile --epochs 1 [--precisions 32-true bf16-mixed] [--set distill.lr=0.05 ...]

The teacher is the profile's (give ``--set teacher.checkpoint=...`` to use a committed one), the partition
is computed once and shared. Prints a markdown table: one column per setting, one row per cost, each
as seconds per epoch (and % of the epoch); the pool's build is its own row, counted once.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.hardware import cpu_name  # noqa: E402
from pipeline.cli import main as nonn  # noqa: E402

# row -> the profiler actions it sums (regular expressions, whole names; a leading "-" subtracts an action
# that runs nested inside another, as the training step and backward run inside the optimizer step)
STEP, BACKWARD = r"\[Strategy\].*\.training_step", r"\[Strategy\].*\.backward"
ROWS = {
    "data + augmentation (train batches)": [r".*\.train_dataloader_next"],
    "teacher forward": ["teacher_forward"],
    "students forward + losses": [STEP, "-teacher_forward"],
    "backward": [BACKWARD],
    "optimizer update + zero_grad": [r"\[LightningModule\].*\.optimizer_step", "-" + STEP, "-" + BACKWARD,
                                     r"\[LightningModule\].*\.optimizer_zero_grad"],
    "validation (data + forward)": [r".*\.val_next", r"\[Strategy\].*\.validation_step"],
    "checkpointing": [r"\[Callback\]ModelCheckpoint.*\.(on_train_epoch_end|on_validation_end)"],
}


def seconds(profile: dict, terms: list[str]) -> float:
    """Sum of the actions each term matches (``-`` subtracts)."""
    total = 0.0
    for term in terms:
        sign, pattern = (-1.0, term[1:]) if term.startswith("-") else (1.0, term)
        total += sign * sum(v["seconds"] for action, v in profile.items() if re.fullmatch(pattern, action))
    return total


def run(args: argparse.Namespace) -> dict[tuple[int, str | None], dict]:
    base = ["--config", str(args.config), "--run-dir", str(args.run_dir), "--wandb.mode", "disabled",
            "--trainer.progress_bar", "false", "--distill.epochs", str(args.epochs), "--trainer.test", "false"]
    base += [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
    for stage in ("teacher", "partition"):
        if nonn([stage, *base]) != 0:
            sys.exit(f"profile_epoch.py: the {stage} stage failed")
    results = {}
    for views in args.views:
        shutil.rmtree(args.run_dir / "teacher_pool", ignore_errors=True)  # the build is part of what is timed
        for i, precision in enumerate(args.precisions):
            extra = [] if precision is None else ["--trainer.precision", precision]
            if nonn(["distill", *base, *extra, "--force", "--trainer.profile", "true",
                     "--distill.teacher_pool.views", str(views)]) != 0:
                sys.exit(f"profile_epoch.py: distillation with {views} views at {precision or 'its'} precision failed")
            record = json.loads((args.run_dir / "stages" / "distill.json").read_text())["results"]
            if i > 0 and record["teacher_pool"] is not None:
                record["teacher_pool"]["reused"] = True  # built for the first precision, read again here
            profile = json.loads((args.run_dir / "students" / "profile.json").read_text())
            results[views, precision] = {"record": record, "profile": profile}
    return results


def table(results: dict[tuple[int, str | None], dict], epochs: int) -> str:
    names = {(v, p): ("live teacher" if v == 0 else f"pool, V = {v}") + (f", {p}" if p else "") for v, p in results}
    lines = [f"| per epoch ({epochs} epoch{'s' * (epochs > 1)}) | " + " | ".join(names.values()) + " |",
             "|---" * (len(results) + 1) + "|"]
    fits = {v: r["record"]["fit_seconds"] / epochs for v, r in results.items()}
    for row, terms in ROWS.items():
        cells = [seconds(r["profile"], terms) / epochs for r in results.values()]
        lines.append(f"| {row} | " + " | ".join(f"{c:.1f} s ({100 * c / fits[v]:.0f}%)"
                                                 for c, v in zip(cells, results)) + " |")
    rest = {v: fits[v] - sum(seconds(r["profile"], t) for t in ROWS.values()) / epochs for v, r in results.items()}
    lines.append("| everything else (hooks, logging, progress) | " + " | ".join(
        f"{rest[v]:.1f} s ({100 * rest[v] / fits[v]:.0f}%)" for v in results) + " |")
    lines.append("| **fit wall time per epoch** | " + " | ".join(f"**{fits[v]:.1f} s**" for v in results) + " |")
    def build(pool: dict | None) -> str:
        if pool is None:
            return "-"
        return "(the same pool)" if pool.get("reused") else f"{pool['seconds']:.1f} s, {pool['bytes'] / 2**20:.0f} MiB"

    lines.append("| pool build (once per pool) | " + " | ".join(build(r["record"]["teacher_pool"])
                                                           for r in results.values()) + " |")
    lines.append("| peak RSS of the process | " + " | ".join(
        f"{r['record']['peak_rss_mib']:.0f} MiB" for r in results.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_mnist" / "standard.yaml")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 4], help="0 = the live teacher")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=[None], metavar="PRECISION",
                        help="trainer.precision of each column, e.g. 32-true bf16-mixed (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()
    for kv in args.set:
        if "=" not in kv:
            parser.error(f"--set {kv}: write KEY=VALUE")
    results = run(args)
    print(f"\nDistillation epoch profile, {args.config.name}, on {cpu_name()}\n")
    print(table(results, args.epochs))


if __name__ == "__main__":
    main()
